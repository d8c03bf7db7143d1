"""Association negotiation, as acceptor and as requestor (PS3.8 7.1, 9.3.2-9.3.4; PS3.7 D).

Pure functions over the PDU dataclasses: no I/O, no state. The acceptor side turns an
A-ASSOCIATE-RQ and an ``AcceptorPolicy`` into the A-ASSOCIATE-AC or -RJ to send; the
requestor side checks the AC it got against what it proposed.

Choices the standard leaves open, and the catalogue ids they answer:

- A presentation context whose id is 0, even, or used more than once is answered with
  result 2 (provider rejection), never accepted; every context sharing a duplicated id
  is rejected, the first too, so no peer can be unsure which proposal an id means
  (MP-20, MP-21). The association itself proceeds.
- Zero or several abstract syntaxes in one context: result 2 (MP-22); an invalid
  abstract syntax UID: 3; no valid transfer syntax UID: 4 (MP-23).
- When no context is accepted the AC is still sent with every context rejected, as
  PS3.8 9.3.3 describes; the requestor decides (our SCU then aborts). An RQ with no
  presentation context at all is refused (1, 1, 1) (MP-19).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from protocol.errors import (
    LocalProtocolError,
    RejectReason,
    RejectResult,
    RejectSource,
    RemoteProtocolError,
)
from protocol.items import (
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)
from protocol.limits import DEFAULT_MAX_PDU, Limits
from protocol.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ
from protocol.uids import (
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    is_valid_uid,
)

#: Smallest Maximum Length that carries a PDV with one data byte (PS3.8 9.3.5.1: the
#: PDV item header is 6 bytes). 0 means "no limit" (PS3.8 D.1). Catalogue MP-24.
MIN_PEER_MAX_PDU = 7

# Presentation context results (PS3.8 9.3.3.2, Table 9-18).
ACCEPTANCE = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

#: Returns the server response to send (bytes), None to accept without one, or False to
#: reject the association (1, 1, 1).
UserIdentityHook = Callable[[UserIdentityRQ], bytes | Literal[False] | None]


@dataclass(frozen=True, slots=True)
class AcceptorPolicy:
    """What an SCP accepts. Transfer syntax tuples are in *our* order of preference."""

    ae_title: str = "ANY-SCP"
    #: Refuse (1, 1, 7) an RQ whose Called AE Title is not ``ae_title``.
    require_called_ae: bool = False
    #: Calling AE Title allow-check; False refuses (1, 1, 3).
    calling_ae_allowed: Callable[[str], bool] | None = None
    #: Abstract syntax -> transfer syntaxes we accept for it.
    supported: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Accept any (valid) abstract syntax not in ``supported``, with ``transfer_syntaxes``
    #: (storescp-like applications that store whatever they are sent).
    accept_any_abstract_syntax: bool = False
    #: (Calling AE Title, abstract syntax) -> may this requestor use it? False answers the
    #: context with result 1, user-rejection (an operation the peer is not allowed).
    abstract_syntax_permitted: Callable[[str, str], bool] | None = None
    transfer_syntaxes: tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES
    #: When none of our transfer syntaxes was proposed, accept the requestor's first valid
    #: one instead of rejecting the context with result 4.
    accept_any_transfer_syntax: bool = False
    #: SOP classes for which we accept the SCP role when the requestor proposes it.
    scp_role_sop_classes: frozenset[str] = frozenset()
    user_identity: UserIdentityHook | None = None
    #: Refuse (1, 1, 1) an RQ without a User Identity sub-item.
    require_user_identity: bool = False
    max_pdu_length: int = DEFAULT_MAX_PDU
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME


def _reject(source: int, reason: int, result: int = RejectResult.PERMANENT) -> AAssociateRJ:
    return AAssociateRJ(result, source, reason)


def reject_for_limit() -> AAssociateRJ:
    """Too many associations: (2 transient, 3 presentation, 2 local-limit-exceeded)."""
    return _reject(
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectReason.LOCAL_LIMIT_EXCEEDED,
        RejectResult.TRANSIENT,
    )


def _user_reject(reason: int) -> AAssociateRJ:
    return _reject(RejectSource.SERVICE_USER, reason)


# -- acceptor ---------------------------------------------------------------------------
def negotiate_as_acceptor(
    rq: AAssociateRQ, policy: AcceptorPolicy, limits: Limits
) -> AAssociateAC | AAssociateRJ:
    """The reply to ``rq``: an A-ASSOCIATE-RJ with its standard reason, or an AC."""
    refusal = _check_association(rq, policy)
    if refusal is not None:
        return refusal
    user = rq.user_information
    identity_reply = _check_user_identity(user.user_identity_rq, policy)
    if isinstance(identity_reply, AAssociateRJ):
        return identity_reply
    replies = _negotiate_contexts(rq.presentation_contexts, policy, limits, rq.calling_ae)
    accepted = {
        pc.abstract_syntax
        for pc, reply in zip(rq.presentation_contexts, replies, strict=True)
        if reply.result == ACCEPTANCE
    }
    info = UserInformation(
        max_length=policy.max_pdu_length,
        implementation_class_uid=policy.implementation_class_uid,
        implementation_version_name=policy.implementation_version_name,
        role_selections=_reply_roles(user.role_selections, accepted, policy),
        user_identity_ac=identity_reply,
    )
    # PS3.8 9.3.3: the AE title fields echo the request (and are not tested on receipt).
    return AAssociateAC(rq.called_ae, rq.calling_ae, tuple(replies), info)


def _check_association(rq: AAssociateRQ, policy: AcceptorPolicy) -> AAssociateRJ | None:
    if not rq.protocol_version & 1:
        # PS3.8 9.3.2 Table 9-11: only bit 0 is tested (catalogue MP-14, MP-15).
        return _reject(
            RejectSource.SERVICE_PROVIDER_ACSE, RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED
        )
    if rq.application_context.rstrip("\0") != APPLICATION_CONTEXT:  # PS3.7 A.2.1, MP-18
        return _user_reject(RejectReason.APPLICATION_CONTEXT_NAME_NOT_SUPPORTED)
    # AE titles arrive stripped of padding; an all-space title is "" and never matches (MP-28).
    if policy.require_called_ae and (not rq.called_ae or rq.called_ae != policy.ae_title.strip()):
        return _user_reject(RejectReason.CALLED_AE_NOT_RECOGNIZED)
    if policy.calling_ae_allowed is not None and not policy.calling_ae_allowed(rq.calling_ae):
        return _user_reject(RejectReason.CALLING_AE_NOT_RECOGNIZED)
    max_length = rq.user_information.max_length or 0
    if 0 < max_length < MIN_PEER_MAX_PDU:  # catalogue MP-24
        return _user_reject(RejectReason.NO_REASON)
    if not rq.presentation_contexts:  # catalogue MP-19
        return _user_reject(RejectReason.NO_REASON)
    return None


def _check_user_identity(
    identity: UserIdentityRQ | None, policy: AcceptorPolicy
) -> UserIdentityAC | AAssociateRJ | None:
    """PS3.7 D.3.3.7: the hook decides; a positive response is sent only when asked for."""
    if identity is None:
        return _user_reject(RejectReason.NO_REASON) if policy.require_user_identity else None
    if policy.user_identity is None:
        return None  # identity not checked: accepted without a response
    verdict = policy.user_identity(identity)
    if verdict is False:
        return _user_reject(RejectReason.NO_REASON)
    if not identity.positive_response_requested:
        return None
    # D.3.3.7.2: for username (and passcode) the server response is zero length.
    return UserIdentityAC(verdict or b"")


def _negotiate_contexts(
    contexts: Sequence[PresentationContextRQ],
    policy: AcceptorPolicy,
    limits: Limits,
    calling_ae: str,
) -> list[PresentationContextAC]:
    id_counts = Counter(pc.context_id for pc in contexts)
    replies = []
    for index, pc in enumerate(contexts):
        cid = pc.context_id
        # PS3.8 9.3.2.2: ids are odd integers 1..255, unique in the RQ.
        bad_id = cid % 2 == 0 or id_counts[cid] > 1
        if bad_id or index >= limits.max_presentation_contexts:
            replies.append(PresentationContextAC(cid, NO_REASON))
        else:
            result, transfer_syntax = _negotiate_context(pc, policy, calling_ae)
            replies.append(PresentationContextAC(cid, result, transfer_syntax))
    return replies


def _negotiate_context(
    pc: PresentationContextRQ, policy: AcceptorPolicy, calling_ae: str
) -> tuple[int, str]:
    if len(pc.abstract_syntaxes) != 1:  # catalogue MP-22
        return NO_REASON, ""
    abstract = pc.abstract_syntaxes[0].rstrip("\0")
    if not is_valid_uid(abstract):  # catalogue MP-23
        return ABSTRACT_SYNTAX_NOT_SUPPORTED, ""
    permitted = policy.abstract_syntax_permitted
    if permitted is not None and not permitted(calling_ae, abstract):  # catalogue SEC-05
        return USER_REJECTION, ""
    ours = policy.supported.get(abstract)
    if ours is None:
        if not policy.accept_any_abstract_syntax:
            return ABSTRACT_SYNTAX_NOT_SUPPORTED, ""
        ours = policy.transfer_syntaxes
    proposed = [ts.rstrip("\0") for ts in pc.transfer_syntaxes]
    proposed = [ts for ts in proposed if is_valid_uid(ts)]
    offered = set(proposed)
    for ts in ours:  # our preference decides, not the order of the proposal
        if ts in offered:
            return ACCEPTANCE, ts
    if policy.accept_any_transfer_syntax and proposed:
        return ACCEPTANCE, proposed[0]
    return TRANSFER_SYNTAXES_NOT_SUPPORTED, ""


def _reply_roles(
    proposed: Sequence[RoleSelection], accepted: set[str | None], policy: AcceptorPolicy
) -> tuple[RoleSelection, ...]:
    """PS3.7 D.3.3.4: one reply per proposed SOP class; a role is granted only if proposed.

    Only SOP classes of accepted contexts are answered (a reply for anything else would
    mean nothing); the SCU role is granted as proposed, the SCP role only by policy.
    """
    replies: dict[str, RoleSelection] = {}
    for role in proposed:
        uid = role.sop_class_uid.rstrip("\0")
        if uid in replies or uid not in accepted:
            continue
        scp = role.scp_role and uid in policy.scp_role_sop_classes
        replies[uid] = RoleSelection(uid, role.scu_role, scp)
    return tuple(replies.values())


# -- requestor --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the requestor may use after an A-ASSOCIATE-AC."""

    #: context id -> (abstract syntax, transfer syntax), accepted contexts only
    contexts: dict[int, tuple[str, str]]
    #: the acceptor's Maximum Length (0 = unlimited, PS3.8 D.1)
    peer_max_pdu_length: int
    #: SOP class -> (we may act as SCU, we may act as SCP), for every role we proposed;
    #: without a reply the default roles hold (requestor SCU only), PS3.7 D.3.3.4
    roles: dict[str, tuple[bool, bool]]
    user_identity_response: bytes | None = None
    peer_implementation_class_uid: str | None = None
    peer_implementation_version_name: str | None = None


def negotiate_as_requestor(rq: AAssociateRQ, ac: AAssociateAC) -> Negotiated:
    """Check ``ac`` against ``rq`` (catalogue SM-15); raises ``RemoteProtocolError``."""
    proposed = {pc.context_id: pc for pc in rq.presentation_contexts}
    contexts: dict[int, tuple[str, str]] = {}
    answered: set[int] = set()
    for reply in ac.presentation_contexts:
        cid = reply.context_id
        pc = proposed.get(cid)
        if pc is None:
            raise RemoteProtocolError(f"A-ASSOCIATE-AC answers context {cid}, never proposed")
        if cid in answered:
            raise RemoteProtocolError(f"A-ASSOCIATE-AC answers context {cid} twice")
        answered.add(cid)
        if reply.result != ACCEPTANCE:
            continue
        if reply.transfer_syntax not in pc.transfer_syntaxes:
            raise RemoteProtocolError(
                f"A-ASSOCIATE-AC accepts context {cid} with transfer syntax "
                f"{reply.transfer_syntax!r}, which was not offered"
            )
        if pc.abstract_syntax is not None:
            contexts[cid] = (pc.abstract_syntax, reply.transfer_syntax)
    info = ac.user_information
    max_length = info.max_length or 0
    if 0 < max_length < MIN_PEER_MAX_PDU:  # catalogue MP-24 on the requestor side
        raise RemoteProtocolError(
            f"peer maximum PDU length {max_length} cannot carry a PDV with data"
        )
    identity = info.user_identity_ac
    return Negotiated(
        contexts=contexts,
        peer_max_pdu_length=max_length,
        roles=_granted_roles(rq.user_information.role_selections, info.role_selections),
        user_identity_response=None if identity is None else identity.server_response,
        peer_implementation_class_uid=info.implementation_class_uid,
        peer_implementation_version_name=info.implementation_version_name,
    )


def _granted_roles(
    proposed: Sequence[RoleSelection], replies: Sequence[RoleSelection]
) -> dict[str, tuple[bool, bool]]:
    by_uid = {r.sop_class_uid: r for r in replies}
    roles: dict[str, tuple[bool, bool]] = {}
    for role in proposed:
        reply = by_uid.get(role.sop_class_uid)
        if reply is None:
            roles[role.sop_class_uid] = (True, False)  # default roles, PS3.7 D.3.3.4
        else:  # a role the acceptor "grants" that we did not propose is not granted
            roles[role.sop_class_uid] = (
                role.scu_role and reply.scu_role,
                role.scp_role and reply.scp_role,
            )
    return roles


def build_associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    max_pdu_length: int = DEFAULT_MAX_PDU,
    user_identity: UserIdentityRQ | None = None,
    role_selections: tuple[RoleSelection, ...] = (),
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME,
) -> AAssociateRQ:
    """An A-ASSOCIATE-RQ proposing ``contexts`` with context ids 1, 3, 5, ... (PS3.8 9.3.2.2)."""
    if not contexts:
        raise LocalProtocolError("at least one presentation context must be proposed")
    if len(contexts) > 128:
        raise LocalProtocolError(f"{len(contexts)} presentation contexts; at most 128 fit")
    items = []
    for index, (abstract, transfer_syntaxes) in enumerate(contexts):
        if not transfer_syntaxes:
            raise LocalProtocolError(f"no transfer syntax proposed for {abstract}")
        items.append(PresentationContextRQ(2 * index + 1, (abstract,), tuple(transfer_syntaxes)))
    info = UserInformation(
        max_length=max_pdu_length,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
        role_selections=role_selections,
        user_identity_rq=user_identity,
    )
    return AAssociateRQ(called_ae, calling_ae, tuple(items), info)
