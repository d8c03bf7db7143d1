"""Conditions of the rules engine: the grammar of DESIGN §7, typed values, evaluation.

``router.rules`` re-exports everything here; import from there. Pure: no I/O.

A condition reads ``[not] FIELD OP [VALUE]``:

* FIELD — a keyword of the DICOM dictionary (``Modality``), a tag (``(0008,0060)`` or
  ``00080060``), ``Sequence.Keyword`` (the element in any item of the sequence), or one of
  ``calling_aet``, ``called_aet``, ``peer_address``.
* OP — ``==``, ``!=``, ``like``, ``matches``, ``in``, ``<``, ``<=``, ``>``, ``>=`` take a
  VALUE (the rest of the text after the operator, surrounding whitespace removed);
  ``exists`` and ``missing`` take none.

Semantics (the README states them):

* Values are compared one at a time; a multi-valued attribute satisfies a condition when
  any of its values does. Comparisons are case-sensitive.
* An attribute that is absent, or present with only empty values, is *missing*: every
  condition on it is false except ``missing`` (and negations). ``exists`` = at least one
  non-empty value; ``missing`` = not ``exists``.
* ``!=`` is exactly ``not ==``: no value equals (so a missing attribute satisfies it).
  ``not`` negates the whole condition.
* ``like`` — DICOM wildcard (``*`` any run, ``?`` one character), anchored at both ends.
* ``matches`` — Python ``re``, ``re.search`` (unanchored: ``^CHEST`` is a prefix test);
  compiled once at parse time; ``(?i)`` for case-insensitive.
* ``in`` — comma-separated items, whitespace around each trimmed; for ``peer_address``
  each item is an address or a CIDR block (host bits allowed and ignored).
* Typed fields: numeric VRs (US UL SS SL FL FD IS DS UV SV) compare as numbers, DA as
  dates (``YYYYMMDD``), TM as times of day (``HH[MM[SS[.ffffff]]]``), DT as date-times
  (UTC when both sides carry an offset, else their local reading). ``==``/``!=``/``in``
  also hold when both sides are equal as text. ``<``/``<=``/``>``/``>=`` on a typed field
  need a VALUE of that type, on any other tag a number (checked at parse time); they are
  refused for the AE titles and ``peer_address``. An instance value that does not parse
  makes that value fail; bad instance data never raises.
* ``peer_address ==`` compares addresses (``::ffff:10.0.0.1`` equals ``10.0.0.1``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword


class RuleError(ValueError):
    """A condition or rule that cannot be used, with the reason."""


SPECIAL_FIELDS: Final = ("calling_aet", "called_aet", "peer_address")
BINARY_OPS: Final = ("==", "!=", "like", "matches", "in", "<", "<=", ">", ">=")
UNARY_OPS: Final = ("exists", "missing")
ORDER_OPS: Final = ("<", "<=", ">", ">=")

NUMERIC_VRS: Final = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "IS", "DS", "UV", "SV"})
# Values the walker cannot hand over as text; a rule on them could never be evaluated.
_BINARY_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "NONE"})
# VRs whose value is never split on "\": a backslash in a rule value can match them.
_SINGLE_VALUE_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})

_TAG_PAREN = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_TAG_HEX = re.compile(r"[0-9A-Fa-f]{8}")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# FIELD: parenthesised tags or runs without whitespace/operator characters, dot-joined.
_FIELD_TOKEN = re.compile(r"(?:\([^()]*\)|[^\s=!<>()])+")
_SYMBOL_OP = re.compile(r"==|!=|<=|>=|<|>")
_WORD_OP = re.compile(r"([A-Za-z_]+)(?=\s|$)")
_NOT = re.compile(r"not(?=\s)")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{0,6}))?)?)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldRef:
    """What a condition reads: a top-level tag, an element inside a sequence, or a peer fact."""

    kind: str  # "tag" | "sequence" | "calling_aet" | "called_aet" | "peer_address"
    tag: int | None = None  # the attribute, or the sequence for kind "sequence"
    item_tag: int | None = None  # the element inside any item (kind "sequence")

    @property
    def key(self) -> int | tuple[int, int] | None:
        """The key of ``InstanceFacts.values`` holding this field (None for peer facts)."""
        if self.kind == "tag" and self.tag is not None:
            return self.tag
        if self.kind == "sequence" and self.tag is not None and self.item_tag is not None:
            return (self.tag, self.item_tag)
        return None

    @property
    def vr(self) -> str | None:
        """The dictionary VR of the value read (None if unknown, e.g. a private tag)."""
        tag = self.item_tag if self.kind == "sequence" else self.tag
        return None if tag is None else _vr_of(tag)

    @property
    def text(self) -> str:
        if self.kind in SPECIAL_FIELDS:
            return self.kind
        assert self.tag is not None
        if self.kind == "sequence":
            assert self.item_tag is not None
            return f"{_tag_text(self.tag)}.{_tag_text(self.item_tag)}"
        return _tag_text(self.tag)

    def __str__(self) -> str:
        return self.text


def _vr_of(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _tag_text(tag: int) -> str:
    # The keyword only when it maps back to this very tag (repeating groups such as
    # (6002,0010) share "OverlayRows", which tag_for_keyword does not resolve).
    keyword = keyword_for_tag(tag)
    if keyword and tag_for_keyword(keyword) == tag:
        return keyword
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _parse_tag(part: str) -> int:
    if part.startswith("("):
        m = _TAG_PAREN.fullmatch(part)
        if m is None:
            raise RuleError(f"bad tag {part!r}: expected (gggg,eeee) in hexadecimal")
        tag = int(m.group(1), 16) << 16 | int(m.group(2), 16)
    elif part[:1].isdigit():
        if _TAG_HEX.fullmatch(part) is None:
            raise RuleError(f"bad tag {part!r}: expected ggggeeee (8 hexadecimal digits)")
        tag = int(part, 16)
    elif _KEYWORD.fullmatch(part):
        found = tag_for_keyword(part)
        if found is None:
            close = difflib.get_close_matches(part, keyword_dict, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RuleError(f"unknown keyword {part!r}{hint}")
        tag = found
    else:
        raise RuleError(f"bad field {part!r}: expected a keyword or a tag")
    if tag >> 16 == 0xFFFE:
        raise RuleError(f"bad tag {part!r}: item and delimitation tags are not attributes")
    return tag


def parse_field(text: str) -> FieldRef:
    """``Modality``, ``(0008,0060)``, ``00080060``, ``Sequence.Keyword`` or a peer fact."""
    if text in SPECIAL_FIELDS:
        return FieldRef(text)
    parts = text.split(".")
    if len(parts) > 2 or not all(parts):
        raise RuleError(f"bad field {text!r}: expected KEYWORD or SEQUENCE.KEYWORD")
    tags = [_parse_tag(p) for p in parts]
    vrs = [_vr_of(t) for t in tags]
    if len(tags) == 2:
        if vrs[0] is not None and vrs[0] != "SQ":
            raise RuleError(f"{parts[0]!r} in {text!r} is not a sequence (VR {vrs[0]})")
    elif vrs[0] == "SQ":
        raise RuleError(f"{parts[0]!r} is a sequence: name an element inside it, {parts[0]}.X")
    if vrs[-1] == "SQ":
        raise RuleError(f"{parts[-1]!r} is a sequence; nested sequences are not supported")
    if vrs[-1] is not None and set(vrs[-1].split(" or ")) <= _BINARY_VRS:
        raise RuleError(f"{parts[-1]!r} has a binary VR ({vrs[-1]}); rules read text values")
    if len(tags) == 2:
        return FieldRef("sequence", tags[0], tags[1])
    return FieldRef("tag", tags[0])


# --------------------------------------------------------------------------- typed values


def parse_number(text: str) -> Decimal | None:
    # Strict grammar: float()/Decimal() would also take "nan", "inf" and "1_000".
    text = text.strip()
    if _NUMBER.fullmatch(text) is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
        return None


def parse_date(text: str) -> dt.date | None:
    """DA ``YYYYMMDD`` (the ACR-NEMA ``YYYY.MM.DD`` is read too)."""
    m = _DA.fullmatch(text.strip())
    if m is None:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def parse_time(text: str) -> int | None:
    """TM ``HH[MM[SS[.F{1,6}]]]`` (or with colons) as microseconds since midnight."""
    m = _TM.fullmatch(text.strip())
    if m is None:
        return None
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if hh > 23 or mm > 59 or ss > 60:  # 60: a leap second is a valid TM
        return None
    frac = int((m.group(4) or "").ljust(6, "0"))
    return ((hh * 60 + mm) * 60 + ss) * 1_000_000 + frac


class DateTime(NamedTuple):
    """A DT value: its local reading and its UTC offset when it carries one."""

    local: dt.datetime
    offset: dt.timedelta | None


def parse_datetime(text: str) -> DateTime | None:
    """DT ``YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]``; missing components are their minimum."""
    m = _DT.fullmatch(text.strip())
    if m is None:
        return None
    g = m.groups()
    try:
        local = dt.datetime(
            int(g[0]),
            int(g[1] or 1),
            int(g[2] or 1),
            int(g[3] or 0),
            int(g[4] or 0),
            int(g[5] or 0),
            int((g[6] or "").ljust(6, "0")),
        )
    except ValueError:
        return None
    offset = None
    if g[7]:
        hours, minutes = int(g[8]), int(g[9])
        if hours > 14 or minutes > 59:
            return None
        offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if g[7] == "-" else 1)
    return DateTime(local, offset)


def _datetime_pair(a: DateTime, b: DateTime) -> tuple[dt.datetime, dt.datetime]:
    # Both offsets known: compare instants; otherwise the local readings (no guessing of
    # the node's or the modality's time zone).
    if a.offset is not None and b.offset is not None:
        return a.local - a.offset, b.local - b.offset
    return a.local, b.local


_Parser = Callable[[str], Any]
_PARSERS: Final[dict[str, tuple[str, _Parser]]] = {
    "DA": ("a date YYYYMMDD", parse_date),
    "TM": ("a time HH[MM[SS[.ffffff]]]", parse_time),
    "DT": ("a date-time YYYY[MM[DD[HH[MM[SS[.ffffff]]]]]][+/-ZZXX]", parse_datetime),
}
_NUMBER_PARSER: Final[tuple[str, _Parser]] = ("a number", parse_number)


def _typed_parser(ref: FieldRef) -> tuple[str, _Parser] | None:
    """How values of this field compare when typed (None: as text only)."""
    vr = ref.vr
    if vr is None:
        return None
    if vr in _PARSERS:
        return _PARSERS[vr]
    if set(vr.split(" or ")) <= NUMERIC_VRS:
        return _NUMBER_PARSER
    return None


def _normalise_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return _normalise_address(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_network(text: str) -> _Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise RuleError(f"bad address or CIDR block {text!r}: {exc}") from None
    # ::ffff:10.0.0.0/104 is 10.0.0.0/8: peers are normalised the same way.
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


# --------------------------------------------------------------------------- matchers


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


_ORDER: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class _Matcher:
    """The compiled test of one value (a plain object, so that a Condition pickles)."""

    __slots__ = ("items", "kind", "op", "parser", "pattern", "typed")

    def __init__(self, ref: FieldRef, op: str, value: str) -> None:
        self.op = op
        self.kind = "text"
        self.pattern: re.Pattern[str] | None = None
        self.parser: _Parser | None = None
        self.items: tuple[Any, ...] = ()
        self.typed: Any = None
        if op in UNARY_OPS:
            return
        if op == "like":
            self.pattern = _wildcard_regex(value)
        elif op == "matches":
            try:
                self.pattern = re.compile(value)
            except re.error as exc:
                raise RuleError(f"invalid regular expression {value!r}: {exc}") from None
        elif ref.kind == "peer_address":
            self._compile_address(op, value)
        elif op in ORDER_OPS:
            self._compile_order(ref, op, value)
        else:  # == != in
            typed = _typed_parser(ref)
            self.parser = typed[1] if typed else None
            texts = _split_items(value) if op == "in" else (value,)
            # Each item: (text, typed value or None when it does not parse as the VR's type).
            self.items = tuple((t, self.parser(t) if self.parser else None) for t in texts)

    def _compile_address(self, op: str, value: str) -> None:
        if op in ORDER_OPS:
            raise RuleError(f"peer_address cannot be compared with {op}")
        self.kind = "address"
        if op == "in":
            self.items = tuple(_parse_network(t) for t in _split_items(value))
        else:
            address = _parse_address(value)
            if address is None:
                raise RuleError(f"bad address {value!r}")
            self.typed = address

    def _compile_order(self, ref: FieldRef, op: str, value: str) -> None:
        if ref.kind in ("calling_aet", "called_aet"):
            raise RuleError(f"{ref.kind} is text and cannot be compared with {op}")
        what, parser = _typed_parser(ref) or _NUMBER_PARSER
        typed = parser(value)
        if typed is None:
            raise RuleError(f"{ref.text} {op} needs {what}, not {value!r}")
        self.kind, self.parser, self.typed = "order", parser, typed

    def test(self, value: str) -> bool:
        """Whether one (non-empty) value satisfies the operator (``!=`` tests ``==``)."""
        if self.pattern is not None:
            if self.op == "like":
                return self.pattern.fullmatch(value) is not None
            return self.pattern.search(value) is not None
        if self.kind == "address":
            address = _parse_address(value)
            if address is None:
                return False
            if self.op == "in":
                return any(address in net for net in self.items)
            return bool(address == self.typed)
        if self.kind == "order":
            assert self.parser is not None
            parsed = self.parser(value)
            if parsed is None:
                return False
            a, b = parsed, self.typed
            if isinstance(a, DateTime):
                a, b = _datetime_pair(a, b)
            return _ORDER[self.op](a, b)
        parsed = self.parser(value) if self.parser else None
        for text, typed in self.items:
            if value == text:
                return True
            if typed is not None and parsed is not None:
                if isinstance(parsed, DateTime):
                    left, right = _datetime_pair(parsed, typed)
                    if left == right:
                        return True
                elif parsed == typed:
                    return True
        return False


def _split_items(value: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in value.split(","))
    if not all(items):
        raise RuleError(f"empty item in list {value!r}")
    return items


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class InstanceFacts:
    """What the rules see of one instance (router-internals.md, rules.py)."""

    values: Mapping[int | tuple[int, int], tuple[str, ...]]
    calling_aet: str = ""
    called_aet: str = ""
    peer_address: str = ""


def _present_values(ref: FieldRef, facts: InstanceFacts) -> list[str]:
    """The non-empty values of the field, stripped; tolerant of malformed input."""
    if ref.kind in SPECIAL_FIELDS:
        raw: object = (getattr(facts, ref.kind),)
        strip = " \t\r\n\x00"  # AE titles: leading spaces are not significant either
    else:
        raw = facts.values.get(ref.key) if ref.key is not None else None
        strip = ""
    if raw is None:
        return []
    if isinstance(raw, str | bytes):
        raw = (raw,)
    out = []
    for item in raw if isinstance(raw, Iterable) else ():
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        elif not isinstance(item, str):
            continue
        item = item.strip(strip) if strip else item.rstrip(" \x00")
        if item:
            out.append(item)
    return out


@dataclass(frozen=True)
class Condition:
    """One parsed condition; ``text`` is its canonical form (``parse_condition`` round-trips).

    Build with ``parse_condition``. Constructing directly validates and compiles too;
    ``text`` is then computed (or checked when given).
    """

    field: FieldRef
    op: str
    value: str = ""
    negated: bool = False
    text: str = ""
    _matcher: _Matcher = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.op not in BINARY_OPS and self.op not in UNARY_OPS:
            raise RuleError(f"unknown operator {self.op!r}")
        if self.op in UNARY_OPS and self.value:
            raise RuleError(f"{self.op!r} takes no value (got {self.value!r})")
        if self.op in BINARY_OPS:
            if not self.value:
                raise RuleError(f"missing value after {self.op!r}")
            if self.value != self.value.strip():
                raise RuleError(f"value {self.value!r} has surrounding whitespace")
            if self.op == "in":  # canonical list: items trimmed, joined by ","
                object.__setattr__(self, "value", ",".join(_split_items(self.value)))
            _check_backslash(self.field, self.op, self.value)
        canonical = " ".join(
            p for p in ("not" if self.negated else "", self.field.text, self.op, self.value) if p
        )
        if self.text and self.text != canonical:
            raise RuleError(f"text {self.text!r} is not the canonical {canonical!r}")
        object.__setattr__(self, "text", canonical)
        object.__setattr__(self, "_matcher", _Matcher(self.field, self.op, self.value))

    def evaluate(self, facts: InstanceFacts) -> bool:
        """Whether the instance satisfies the condition. Never raises on instance data."""
        try:
            values = _present_values(self.field, facts)
            if self.op in UNARY_OPS:
                result = bool(values) == (self.op == "exists")
            elif self.op == "!=":  # exactly `not ==`
                result = not any(self._matcher.test(v) for v in values)
            else:
                result = any(self._matcher.test(v) for v in values)
        except Exception:  # bad instance data: the condition does not hold
            result = self.op in ("!=", "missing")
        return result != self.negated

    def __str__(self) -> str:
        return self.text


def _check_backslash(ref: FieldRef, op: str, value: str) -> None:
    # Values are compared one at a time, so "ImageType == ORIGINAL\PRIMARY" could never
    # hold: say so now instead of routing nothing later.
    if op not in ("==", "!=", "in", "like") or "\\" not in value:
        return
    if ref.kind not in ("tag", "sequence") or ref.vr is None or ref.vr in _SINGLE_VALUE_VRS:
        return
    raise RuleError(
        f"{value!r} contains '\\': values of {ref.text} are compared one at a time;"
        " use one condition per value"
    )


def parse_condition(text: str) -> Condition:
    """Parse ``[not] FIELD OP [VALUE]`` (DESIGN §7); RuleError with the reason otherwise."""
    rest = text.strip()
    if not rest:
        raise RuleError("empty condition")
    negated = False
    if m := _NOT.match(rest):
        negated, rest = True, rest[m.end() :].lstrip()
    m = _FIELD_TOKEN.match(rest)
    if m is None:
        raise RuleError(f"expected a field at {rest!r} in {text!r}")
    if m.group() == "not":
        raise RuleError(f"'not' may appear once, before the field: {text!r}")
    ref = parse_field(m.group())
    rest = rest[m.end() :].lstrip()
    if not rest:
        raise RuleError(f"missing operator after {m.group()!r}")
    if sm := _SYMBOL_OP.match(rest):
        op, rest = sm.group(), rest[sm.end() :]
    elif (wm := _WORD_OP.match(rest)) and wm.group(1) in BINARY_OPS + UNARY_OPS:
        op, rest = wm.group(1), rest[wm.end() :]
    else:
        token = rest.split(maxsplit=1)[0]
        raise RuleError(
            f"unknown operator {token!r}; expected one of {', '.join(BINARY_OPS + UNARY_OPS)}"
        )
    return Condition(ref, op, rest.strip(), negated)


def parse_conditions(texts: Iterable[str]) -> tuple[Condition, ...]:
    return tuple(parse_condition(t) for t in texts)
