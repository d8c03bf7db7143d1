"""Association negotiation (PS3.8 7.1, 9.3.2-9.3.4; PS3.7 D.3.3); catalogue B.1 MP-xx, B.2 SM-15."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol.acse import (
    AcceptorPolicy,
    Negotiated,
    build_associate_rq,
    negotiate_as_acceptor,
    negotiate_as_requestor,
    reject_for_limit,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.items import (
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)
from protocol.limits import Limits
from protocol.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ, decode_pdu
from protocol.uids import (
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLICIT_VR_LE,
    VERIFICATION,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG = "1.2.840.10008.1.2.4.50"
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE)

POLICY = AcceptorPolicy(
    ae_title="ROUTER",
    supported={VERIFICATION: UNCOMPRESSED, CT: (EXPLICIT_VR_LE, IMPLICIT_VR_LE)},
)
LIMITS = Limits()


def rq(
    *contexts: PresentationContextRQ,
    called: str = "ROUTER",
    calling: str = "MODALITY",
    **user: object,
) -> AAssociateRQ:
    info = UserInformation(max_length=16384, implementation_class_uid="1.2.3")
    info = replace(info, **user)  # type: ignore[arg-type]
    if not contexts:
        contexts = (PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),)
    return AAssociateRQ(called, calling, contexts, info)


def accept(request: AAssociateRQ, policy: AcceptorPolicy = POLICY) -> AAssociateAC:
    reply = negotiate_as_acceptor(request, policy, LIMITS)
    assert isinstance(reply, AAssociateAC), reply
    return reply


def refuse(request: AAssociateRQ, policy: AcceptorPolicy = POLICY) -> tuple[int, int, int]:
    reply = negotiate_as_acceptor(request, policy, LIMITS)
    assert isinstance(reply, AAssociateRJ), reply
    return reply.result, reply.source, reply.reason


def results(ac: AAssociateAC) -> list[tuple[int, int, str]]:
    return [(pc.context_id, pc.result, pc.transfer_syntax) for pc in ac.presentation_contexts]


# -- association-level checks ---------------------------------------------------------------
def test_minimal_verification_accepted() -> None:
    ac = accept(rq())
    assert results(ac) == [(1, 0, IMPLICIT_VR_LE)]
    assert ac.called_ae == "ROUTER" and ac.calling_ae == "MODALITY"
    assert ac.user_information.max_length == POLICY.max_pdu_length
    assert ac.user_information.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert ac.user_information.implementation_version_name
    # the AC encodes and decodes (it is what goes on the wire)
    body = ac.encode()[6:]
    assert decode_pdu(2, body) == ac


def test_catalogue_b0_reference_rq_is_accepted() -> None:
    raw = (
        bytes.fromhex("010000 0000b9 0001 0000".replace(" ", ""))
        + b"ROUTER          MODALITY        "
        + bytes(32)
        + (
            bytes.fromhex("10000015")
            + b"1.2.840.10008.3.1.1.1"
            + bytes.fromhex("2000002e01000000")
            + bytes.fromhex("30000011")
            + b"1.2.840.10008.1.1"
            + bytes.fromhex("40000011")
            + b"1.2.840.10008.1.2"
            + bytes.fromhex("500000265100000400004000")
            + bytes.fromhex("5200001a")
            + b"1.2.826.0.1.3680043.9.9999"
        )
    )
    request = decode_pdu(1, raw[6:])
    assert isinstance(request, AAssociateRQ)
    assert results(accept(request)) == [(1, 0, IMPLICIT_VR_LE)]


def test_mp14_protocol_version_bit0_clear() -> None:
    assert refuse(replace(rq(), protocol_version=0)) == (1, 2, 2)


@pytest.mark.parametrize("version", [0x0003, 0x8001])
def test_mp15_other_version_bits_ignored(version: int) -> None:
    accept(replace(rq(), protocol_version=version))


@pytest.mark.parametrize("name", ["1.2.840.10008.3.1.1.2", "garbage", ""])
def test_mp18_application_context(name: str) -> None:
    assert refuse(replace(rq(), application_context=name)) == (1, 1, 2)


def test_application_context_nul_padded_accepted() -> None:
    accept(replace(rq(), application_context="1.2.840.10008.3.1.1.1\0"))


def test_mp19_no_presentation_context() -> None:
    request = AAssociateRQ("ROUTER", "MODALITY", (), UserInformation(max_length=0))
    assert refuse(request) == (1, 1, 1)


def test_called_ae_checked_only_when_required() -> None:
    accept(rq(called="OTHER"))
    strict = replace(POLICY, require_called_ae=True)
    assert refuse(rq(called="OTHER"), strict) == (1, 1, 7)
    accept(rq(called="ROUTER"), strict)


@pytest.mark.parametrize(
    "title", ["", "router", "ROUTER\x80", "../x", "ROUT\\ER", "ROUTER\n", "\x00" * 4]
)
def test_mp28_odd_called_ae_titles_refused(title: str) -> None:
    strict = replace(POLICY, require_called_ae=True)
    assert refuse(rq(called=title), strict) == (1, 1, 7)


def test_mp28_all_space_title_never_matches() -> None:
    # Decoded AE titles are stripped; a blank policy title must not match a blank RQ.
    strict = replace(POLICY, ae_title="   ", require_called_ae=True)
    assert refuse(rq(called=""), strict) == (1, 1, 7)


def test_mp28_odd_calling_ae_titles_survive_encoding() -> None:
    ac = accept(rq(calling="\xff\\../\n"))
    assert decode_pdu(2, ac.encode()[6:]) == ac


def test_calling_ae_predicate() -> None:
    allow = replace(POLICY, calling_ae_allowed=lambda ae: ae in {"MODALITY"})
    accept(rq(calling="MODALITY"), allow)
    assert refuse(rq(calling="STRANGER"), allow) == (1, 1, 3)
    assert refuse(rq(calling="../secret/VICTIM"), allow) == (1, 1, 3)


@pytest.mark.parametrize("value", [1, 6])
def test_mp24_max_length_too_small(value: int) -> None:
    assert refuse(rq(max_length=value)) == (1, 1, 1)


@pytest.mark.parametrize("value", [0, 7, 0xFFFFFFFF, None])
def test_mp24_max_length_usable(value: int | None) -> None:
    accept(rq(max_length=value))


def test_reject_for_limit() -> None:
    assert reject_for_limit() == AAssociateRJ(2, 3, 2)


# -- presentation contexts --------------------------------------------------------------------
def test_our_transfer_syntax_preference_wins() -> None:
    pc = PresentationContextRQ(1, (CT,), (IMPLICIT_VR_LE, EXPLICIT_VR_LE))
    assert results(accept(rq(pc))) == [(1, 0, EXPLICIT_VR_LE)]


def test_unsupported_abstract_syntax() -> None:
    pc = PresentationContextRQ(1, (MR,), (IMPLICIT_VR_LE,))
    assert results(accept(rq(pc))) == [(1, 3, "")]


def test_no_common_transfer_syntax() -> None:
    pc = PresentationContextRQ(1, (CT,), (JPEG, EXPLICIT_VR_BE))
    assert results(accept(rq(pc))) == [(1, 4, "")]


def test_accept_any_abstract_syntax_and_transfer_syntax() -> None:
    storescp = AcceptorPolicy(
        accept_any_abstract_syntax=True,
        transfer_syntaxes=UNCOMPRESSED,
        accept_any_transfer_syntax=True,
    )
    contexts = (
        PresentationContextRQ(1, (MR,), (IMPLICIT_VR_LE, EXPLICIT_VR_LE)),
        PresentationContextRQ(3, (CT,), (JPEG,)),
        PresentationContextRQ(5, (CT,), ("1.2.x", JPEG)),
    )
    assert results(accept(rq(*contexts), storescp)) == [
        (1, 0, EXPLICIT_VR_LE),
        (3, 0, JPEG),
        (5, 0, JPEG),
    ]
    strict_ts = replace(storescp, accept_any_transfer_syntax=False)
    assert results(accept(rq(*contexts), strict_ts))[1] == (3, 4, "")


def test_mp20_context_ids_zero_even_duplicate() -> None:
    contexts = (
        PresentationContextRQ(0, (CT,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(2, (CT,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(5, (CT,), (IMPLICIT_VR_LE,)),
    )
    assert results(accept(rq(*contexts))) == [
        (0, 2, ""),
        (2, 2, ""),
        (3, 2, ""),  # every copy of a duplicated id is rejected, the first too
        (3, 2, ""),
        (5, 0, IMPLICIT_VR_LE),
    ]


def test_mp21_context_count_limit() -> None:
    contexts = [PresentationContextRQ(i, (CT,), (IMPLICIT_VR_LE,)) for i in range(1, 256, 2)]
    contexts.append(PresentationContextRQ(1, (CT,), (IMPLICIT_VR_LE,)))  # repeated id
    ac = accept(rq(*contexts))
    got = results(ac)
    assert len(got) == 129
    assert got[0] == (1, 2, "") and got[-1] == (1, 2, "")
    assert all(result == 0 for _, result, _ in got[1:-1])
    small = Limits(max_presentation_contexts=2)
    reply = negotiate_as_acceptor(rq(*contexts[:4]), POLICY, small)
    assert isinstance(reply, AAssociateAC)
    assert [pc.result for pc in reply.presentation_contexts] == [0, 0, 2, 2]


def test_mp22_abstract_syntax_count_and_no_transfer_syntax() -> None:
    contexts = (
        PresentationContextRQ(1, (), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT, VERIFICATION), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(5, (CT,), ()),
        PresentationContextRQ(7, (CT,), (IMPLICIT_VR_LE,)),
    )
    assert results(accept(rq(*contexts))) == [
        (1, 2, ""),
        (3, 2, ""),
        (5, 4, ""),
        (7, 0, IMPLICIT_VR_LE),
    ]


@pytest.mark.parametrize(
    ("abstract", "result"),
    [
        ("1." + "2" * 64, 3),
        ("1.2.abc", 3),
        (CT + " ", 3),
        (CT[:5] + "\0" + CT[5:], 3),
        (CT + "\0", 0),  # trailing NUL pad is legal (PS3.5 9.1)
    ],
)
def test_mp23_abstract_syntax_uid_validity(abstract: str, result: int) -> None:
    pc = PresentationContextRQ(1, (abstract,), (IMPLICIT_VR_LE,))
    assert results(accept(rq(pc)))[0][1] == result


@pytest.mark.parametrize(
    ("transfer", "result"),
    [(IMPLICIT_VR_LE + "\0", 0), (IMPLICIT_VR_LE + " ", 4), ("1.2.840.10008.1.02", 4)],
)
def test_mp23_transfer_syntax_uid_validity(transfer: str, result: int) -> None:
    pc = PresentationContextRQ(1, (CT,), (transfer,))
    any_ts = replace(POLICY, accept_any_transfer_syntax=True)
    assert results(accept(rq(pc), any_ts))[0][1] == result


def test_all_contexts_rejected_still_accepts_association() -> None:
    pc = PresentationContextRQ(1, (MR,), (IMPLICIT_VR_LE,))
    ac = accept(rq(pc))
    assert [p.result for p in ac.presentation_contexts] == [3]


def test_sec05_contexts_not_permitted_are_user_rejected() -> None:
    """A context the calling AE may not use is answered with result 1 (user-rejection,
    PS3.8 9.3.3.2); the rest of the association goes on, and a refused context's SOP
    class gets no role reply."""
    asked: list[tuple[str, str]] = []

    def echo_only(calling_ae: str, abstract_syntax: str) -> bool:
        asked.append((calling_ae, abstract_syntax))
        return abstract_syntax == VERIFICATION

    policy = replace(POLICY, abstract_syntax_permitted=echo_only)
    contexts = (
        PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(5, ("1.2.3.04",), (IMPLICIT_VR_LE,)),  # invalid UID: 3 first
    )
    roles = (RoleSelection(CT, True, False),)
    ac = accept(rq(*contexts, calling="ECHO1", role_selections=roles), policy)
    assert results(ac) == [(1, 0, IMPLICIT_VR_LE), (3, 1, ""), (5, 3, "")]
    assert ac.user_information.role_selections == ()
    assert asked == [("ECHO1", VERIFICATION), ("ECHO1", CT)]


# -- roles ------------------------------------------------------------------------------------
def test_role_selection_reply() -> None:
    policy = replace(POLICY, scp_role_sop_classes=frozenset({VERIFICATION}))
    contexts = (
        PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(5, (MR,), (IMPLICIT_VR_LE,)),
    )
    roles = (
        RoleSelection(VERIFICATION, True, True),
        RoleSelection(CT, True, True),
        RoleSelection(CT, False, False),  # repeated: the first proposal is answered
        RoleSelection(MR, True, True),  # no accepted context: not answered
    )
    ac = accept(rq(*contexts, role_selections=roles), policy)
    assert ac.user_information.role_selections == (
        RoleSelection(VERIFICATION, True, True),
        RoleSelection(CT, True, False),
    )


def test_no_role_proposal_no_reply() -> None:
    assert accept(rq()).user_information.role_selections == ()


# -- user identity ----------------------------------------------------------------------------
def identity(positive: bool = True, name: bytes = b"alice") -> UserIdentityRQ:
    return UserIdentityRQ(2, positive, name, b"secret")


def test_identity_hook_rejects() -> None:
    policy = replace(POLICY, user_identity=lambda ident: False)
    assert refuse(rq(user_identity_rq=identity()), policy) == (1, 1, 1)


def test_identity_hook_accepts_with_positive_response() -> None:
    seen: list[UserIdentityRQ] = []

    def hook(ident: UserIdentityRQ) -> bytes | None:
        seen.append(ident)
        return None

    policy = replace(POLICY, user_identity=hook)
    ac = accept(rq(user_identity_rq=identity(True)), policy)
    assert seen == [identity(True)]
    assert ac.user_information.user_identity_ac == UserIdentityAC(b"")
    ac = accept(rq(user_identity_rq=identity(False)), policy)
    assert ac.user_information.user_identity_ac is None


def test_identity_hook_server_response() -> None:
    policy = replace(POLICY, user_identity=lambda ident: b"ticket")
    ac = accept(rq(user_identity_rq=identity(True)), policy)
    assert ac.user_information.user_identity_ac == UserIdentityAC(b"ticket")


def test_identity_required() -> None:
    policy = replace(POLICY, require_user_identity=True, user_identity=lambda ident: None)
    assert refuse(rq(), policy) == (1, 1, 1)
    accept(rq(user_identity_rq=identity(False)), policy)


def test_identity_ignored_without_hook() -> None:
    ac = accept(rq(user_identity_rq=identity(True)))
    assert ac.user_information.user_identity_ac is None


# -- requestor --------------------------------------------------------------------------------
def test_build_associate_rq_odd_ids() -> None:
    request = build_associate_rq(
        "PACS",
        "ROUTER",
        [(VERIFICATION, [IMPLICIT_VR_LE]), (CT, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)), (MR, [JPEG])],
        max_pdu_length=32768,
        user_identity=identity(),
        role_selections=(RoleSelection(CT, True, False),),
    )
    assert [pc.context_id for pc in request.presentation_contexts] == [1, 3, 5]
    assert request.presentation_contexts[1].transfer_syntaxes == (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
    assert request.user_information.max_length == 32768
    assert request.user_information.user_identity_rq == identity()
    assert decode_pdu(1, request.encode()[6:]) == request


def test_build_associate_rq_limits() -> None:
    with pytest.raises(LocalProtocolError):
        build_associate_rq("A", "B", [])
    with pytest.raises(LocalProtocolError):
        build_associate_rq("A", "B", [(CT, [IMPLICIT_VR_LE])] * 129)
    with pytest.raises(LocalProtocolError):
        build_associate_rq("A", "B", [(CT, [])])
    assert len(build_associate_rq("A", "B", [(CT, [IMPLICIT_VR_LE])] * 128).presentation_contexts)


def test_requestor_round_trip_with_acceptor() -> None:
    request = build_associate_rq(
        "ROUTER",
        "SCU",
        [(VERIFICATION, [IMPLICIT_VR_LE]), (CT, [IMPLICIT_VR_LE, EXPLICIT_VR_LE]), (MR, [JPEG])],
        role_selections=(RoleSelection(CT, True, True), RoleSelection(VERIFICATION, True, True)),
        user_identity=identity(True),
    )
    policy = replace(POLICY, user_identity=lambda ident: b"ok")
    ac = accept(request, policy)
    got = negotiate_as_requestor(request, ac)
    assert got == Negotiated(
        contexts={1: (VERIFICATION, IMPLICIT_VR_LE), 3: (CT, EXPLICIT_VR_LE)},
        peer_max_pdu_length=POLICY.max_pdu_length,
        roles={CT: (True, False), VERIFICATION: (True, False)},
        user_identity_response=b"ok",
        peer_implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        peer_implementation_version_name=POLICY.implementation_version_name,
    )


def ac_with(*contexts: PresentationContextAC, **user: object) -> AAssociateAC:
    info = replace(UserInformation(max_length=16384), **user)  # type: ignore[arg-type]
    return AAssociateAC("PACS", "ROUTER", contexts, info)


REQUEST = build_associate_rq("PACS", "ROUTER", [(CT, [IMPLICIT_VR_LE]), (MR, [EXPLICIT_VR_LE])])


def test_sm15_context_never_proposed() -> None:
    with pytest.raises(RemoteProtocolError, match="never proposed"):
        negotiate_as_requestor(REQUEST, ac_with(PresentationContextAC(7, 0, IMPLICIT_VR_LE)))


def test_sm15_transfer_syntax_never_offered() -> None:
    with pytest.raises(RemoteProtocolError, match="not offered"):
        negotiate_as_requestor(REQUEST, ac_with(PresentationContextAC(3, 0, IMPLICIT_VR_LE)))


def test_sm15_context_answered_twice() -> None:
    ac = ac_with(PresentationContextAC(1, 0, IMPLICIT_VR_LE), PresentationContextAC(1, 3))
    with pytest.raises(RemoteProtocolError, match="twice"):
        negotiate_as_requestor(REQUEST, ac)


def test_rejected_context_transfer_syntax_not_checked() -> None:
    ac = ac_with(
        PresentationContextAC(1, 4, "1.2.3.4"), PresentationContextAC(3, 0, EXPLICIT_VR_LE)
    )
    got = negotiate_as_requestor(REQUEST, ac)
    assert got.contexts == {3: (MR, EXPLICIT_VR_LE)}
    assert got.roles == {}


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0), (None, 0), (7, 7), (0xFFFFFFFF, 0xFFFFFFFF)]
)
def test_sm15_peer_max_length(value: int | None, expected: int) -> None:
    got = negotiate_as_requestor(REQUEST, ac_with(max_length=value))
    assert got.peer_max_pdu_length == expected


@pytest.mark.parametrize("value", [1, 6])
def test_mp24_requestor_refuses_tiny_peer_max_length(value: int) -> None:
    with pytest.raises(RemoteProtocolError):
        negotiate_as_requestor(REQUEST, ac_with(max_length=value))


def test_requestor_roles_without_reply_are_defaults() -> None:
    request = build_associate_rq(
        "PACS", "ROUTER", [(CT, [IMPLICIT_VR_LE])], role_selections=(RoleSelection(CT, True, True),)
    )
    got = negotiate_as_requestor(request, ac_with(PresentationContextAC(1, 0, IMPLICIT_VR_LE)))
    assert got.roles == {CT: (True, False)}
    granted = ac_with(
        PresentationContextAC(1, 0, IMPLICIT_VR_LE),
        role_selections=(RoleSelection(CT, True, True),),
    )
    assert negotiate_as_requestor(request, granted).roles == {CT: (True, True)}
    only_scu = build_associate_rq(
        "PACS",
        "ROUTER",
        [(CT, [IMPLICIT_VR_LE])],
        role_selections=(RoleSelection(CT, True, False),),
    )
    # a role the acceptor grants but we never proposed is not ours
    assert negotiate_as_requestor(only_scu, granted).roles == {CT: (True, False)}
