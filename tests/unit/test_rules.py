"""router.rules: the condition grammar, typed comparisons, rule ordering and explanations."""

from __future__ import annotations

import pickle
import string

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword

from router.rules import (
    Condition,
    FieldRef,
    InstanceFacts,
    RuleError,
    RuleSet,
    RuleSpec,
    parse_condition,
)


def tag(keyword: str) -> int:
    found = tag_for_keyword(keyword)
    assert found is not None, keyword
    return found


def facts(
    values: dict[str, tuple[str, ...]] | None = None,
    *,
    calling_aet: str = "CT1",
    called_aet: str = "ROUTER",
    peer_address: str = "10.1.2.3",
) -> InstanceFacts:
    """Facts keyed by keyword (``Seq.Keyword`` for a sequence path) for readability."""
    out: dict[int | tuple[int, int], tuple[str, ...]] = {}
    for name, vals in (values or {}).items():
        if "." in name:
            seq, item = name.split(".")
            out[(tag(seq), tag(item))] = vals
        else:
            out[tag(name)] = vals
    return InstanceFacts(out, calling_aet, called_aet, peer_address)


CT = facts(
    {
        "Modality": ("CT",),
        "StudyDescription": ("CHEST PA",),
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "SeriesNumber": ("01",),
        "SliceThickness": ("5.000",),
        "Rows": ("512",),
        "AccessionNumber": ("A100",),
        "InstitutionName": ("",),  # present, empty value
        "StudyDate": ("20240315",),
        "StudyTime": ("101530.25",),
        "AcquisitionDateTime": ("20240315101530+0100",),
        "ReferencedImageSequence.ReferencedSOPClassUID": ("1.2.3", "1.2.4"),
        "OperatorsName": (),  # present-but-empty, as the walker reports it
    },
    calling_aet="CT1",
    called_aet="ROUTER",
    peer_address="10.1.2.3",
)
MR = facts(
    {"Modality": ("MR",), "StudyDescription": ("chest",), "Rows": ("abc",)},
    calling_aet="MR_2 ",  # trailing space: AE titles are compared stripped
    peer_address="::ffff:192.168.7.9",
)
BARE = facts({}, calling_aet="", called_aet="", peer_address="")

# (id, condition, facts, expected)
CONDITION_CASES: list[tuple[str, str, InstanceFacts, bool]] = [
    # == and !=
    ("eq", "Modality == CT", CT, True),
    ("eq-other", "Modality == CT", MR, False),
    ("eq-case-sensitive", "Modality == ct", CT, False),
    ("eq-tag-paren", "(0008,0060) == CT", CT, True),
    ("eq-tag-hex", "00080060 == CT", CT, True),
    ("eq-multivalued-any", "ImageType == AXIAL", CT, True),
    ("eq-missing-attr", "Modality == CT", BARE, False),
    ("eq-empty-value", "InstitutionName == X", CT, False),
    ("eq-IS-numeric", "SeriesNumber == 1", CT, True),
    ("eq-IS-text", "SeriesNumber == 01", CT, True),
    ("eq-DS-numeric", "SliceThickness == 5", CT, True),
    ("eq-SH-not-numeric", "AccessionNumber == A100.0", CT, False),
    ("eq-DA", "StudyDate == 20240315", CT, True),
    ("eq-TM-as-time", "StudyTime == 101530.250", CT, True),
    ("eq-DT-same-instant", "AcquisitionDateTime == 20240315091530+0000", CT, True),
    ("ne", "Modality != CT", MR, True),
    ("ne-equal", "Modality != CT", CT, False),
    ("ne-missing-holds", "Modality != CT", BARE, True),
    ("ne-multivalued-none-equal", "ImageType != LOCALIZER", CT, True),
    ("ne-multivalued-one-equal", "ImageType != PRIMARY", CT, False),
    ("ne-numeric", "SeriesNumber != 1", CT, False),
    # like
    ("like-star", "StudyDescription like CHEST*", CT, True),
    ("like-anchored", "StudyDescription like CHEST", CT, False),
    ("like-question", "Modality like C?", CT, True),
    ("like-question-one-char", "Modality like C??", CT, False),
    ("like-star-empty-run", "Modality like CT*", CT, True),
    ("like-regex-chars-literal", "StudyDescription like CHEST.PA", CT, False),
    ("like-case-sensitive", "StudyDescription like chest*", CT, False),
    ("like-missing", "Modality like *", BARE, False),
    ("like-empty-value", "InstitutionName like *", CT, False),
    # matches
    ("matches-search", "StudyDescription matches PA", CT, True),
    ("matches-anchor", "StudyDescription matches ^CHEST", CT, True),
    ("matches-anchor-fails", "StudyDescription matches ^PA", CT, False),
    ("matches-case-sensitive", "StudyDescription matches ^CHEST", MR, False),
    ("matches-ignorecase-flag", "StudyDescription matches (?i)^CHEST", MR, True),
    ("matches-multivalued", "ImageType matches ^AX", CT, True),
    # in
    ("in", "Modality in MR, CT ,PT", CT, True),
    ("in-none", "Modality in MR,PT", CT, False),
    ("in-numeric", "SeriesNumber in 2, 1", CT, True),
    ("in-missing", "Modality in CT,MR", BARE, False),
    # ordering: numbers
    ("lt-US", "Rows < 1024", CT, True),
    ("gt-US", "Rows > 512", CT, False),
    ("ge-US", "Rows >= 512", CT, True),
    ("le-DS", "SliceThickness <= 5", CT, True),
    ("lt-DS-decimal", "SliceThickness < 5.0001", CT, True),
    ("gt-untyped-number", "SeriesNumber > 0", CT, True),
    ("lt-nonnumeric-instance", "Rows < 1024", MR, False),
    ("not-lt-nonnumeric-instance", "not Rows < 1024", MR, True),
    ("lt-missing", "Rows < 1024", BARE, False),
    ("lt-untyped-nonnumeric-instance", "AccessionNumber < 5", CT, False),
    # ordering: dates, times, date-times
    ("lt-DA", "StudyDate < 20240401", CT, True),
    ("ge-DA", "StudyDate >= 20240316", CT, False),
    ("le-DA-equal", "StudyDate <= 20240315", CT, True),
    ("gt-TM-partial-hour", "StudyTime > 10", CT, True),
    ("lt-TM-partial-minute", "StudyTime < 1015", CT, False),
    ("lt-TM-fraction", "StudyTime < 101530.26", CT, True),
    ("lt-TM-colons", "StudyTime < 10:16", CT, True),
    ("gt-DT-utc", "AcquisitionDateTime > 20240315093000+0000", CT, False),
    ("gt-DT-local", "AcquisitionDateTime > 20240315100000", CT, True),
    ("lt-DT-partial", "AcquisitionDateTime < 2025", CT, True),
    # exists / missing
    ("exists", "Modality exists", CT, True),
    ("exists-absent", "Modality exists", BARE, False),
    ("exists-empty-string", "InstitutionName exists", CT, False),
    ("exists-empty-tuple", "OperatorsName exists", CT, False),
    ("missing-absent", "Modality missing", BARE, True),
    ("missing-empty", "InstitutionName missing", CT, True),
    ("missing-present", "Modality missing", CT, False),
    ("not-exists", "not Modality exists", BARE, True),
    # negation
    ("not-eq", "not Modality == CT", CT, False),
    ("not-eq-missing", "not Modality == CT", BARE, True),
    ("not-ne", "not Modality != CT", CT, True),
    ("not-like", "not StudyDescription like CHEST*", MR, True),
    ("not-in", "not Modality in MR,PT", CT, True),
    ("not-missing", "not Modality missing", CT, True),
    # sequences: any item
    ("seq-eq-any-item", "ReferencedImageSequence.ReferencedSOPClassUID == 1.2.4", CT, True),
    ("seq-eq-none", "ReferencedImageSequence.ReferencedSOPClassUID == 1.2.5", CT, False),
    ("seq-by-tags", "(0008,1140).(0008,1150) like 1.2.*", CT, True),
    ("seq-missing", "ReferencedImageSequence.ReferencedSOPClassUID exists", MR, False),
    # AE titles
    ("calling-eq", "calling_aet == CT1", CT, True),
    ("calling-stripped", "calling_aet == MR_2", MR, True),
    ("calling-in", "calling_aet in CT1,CT2", CT, True),
    ("calling-like", "calling_aet like MR*", MR, True),
    ("called-eq", "called_aet == ROUTER", CT, True),
    ("called-ne", "called_aet != ROUTER", CT, False),
    ("calling-empty-missing", "calling_aet missing", BARE, True),
    ("calling-empty-eq", "calling_aet == CT1", BARE, False),
    # peer address
    ("peer-eq", "peer_address == 10.1.2.3", CT, True),
    ("peer-eq-other", "peer_address == 10.1.2.4", CT, False),
    ("peer-in-cidr", "peer_address in 10.0.0.0/8", CT, True),
    ("peer-in-cidr-outside", "peer_address in 10.2.0.0/16, 192.168.0.0/16", CT, False),
    ("peer-in-address-item", "peer_address in 192.168.0.1, 10.1.2.3", CT, True),
    ("peer-mapped-v6-in-v4-cidr", "peer_address in 192.168.7.0/24", MR, True),
    ("peer-mapped-v6-eq-v4", "peer_address == 192.168.7.9", MR, True),
    ("peer-v4-in-mapped-cidr", "peer_address in ::ffff:10.0.0.0/104", CT, True),
    ("peer-in-v6-cidr", "peer_address in 2001:db8::/32", CT, False),
    ("peer-like", "peer_address like 10.1.*", CT, True),
    ("peer-missing", "peer_address in 0.0.0.0/0", BARE, False),
    ("peer-host-bits-ignored", "peer_address in 10.1.2.200/24", CT, True),
]


@pytest.mark.parametrize(
    ("text", "instance", "expected"),
    [pytest.param(t, f, e, id=i) for i, t, f, e in CONDITION_CASES],
)
def test_condition(text: str, instance: InstanceFacts, expected: bool) -> None:
    assert parse_condition(text).evaluate(instance) is expected


def test_every_operator_is_covered() -> None:
    ops = {parse_condition(t).op for _, t, _, _ in CONDITION_CASES}
    assert ops == {"==", "!=", "like", "matches", "in", "<", "<=", ">", ">=", "exists", "missing"}


BAD_VALUES = [
    pytest.param({tag("Rows"): ("\udcff\udcfe",)}, id="surrogates"),
    pytest.param({tag("Rows"): "512"}, id="str-not-tuple"),
    pytest.param({tag("Rows"): (b"\xff\xfe",)}, id="bytes"),
    pytest.param({tag("Rows"): (None, 5)}, id="non-str-items"),
    pytest.param({tag("Rows"): None}, id="none"),
    pytest.param({tag("Rows"): ("1e999999999",)}, id="huge-exponent"),
    pytest.param({tag("Rows"): ("NaN", "inf", "1_000")}, id="not-dicom-numbers"),
]


@pytest.mark.parametrize("values", BAD_VALUES)
@pytest.mark.parametrize(
    "text",
    ["Rows < 10", "Rows == 1", "Rows like 5*", "Rows matches ^5", "Rows in 1,2", "Rows exists"],
)
def test_bad_instance_data_never_raises(values: dict[int, object], text: str) -> None:
    instance = InstanceFacts(values, "CT1", "ROUTER", "not an address")  # type: ignore[arg-type]
    assert isinstance(parse_condition(text).evaluate(instance), bool)
    assert parse_condition("peer_address in 10.0.0.0/8").evaluate(instance) is False


def test_values_stripped_defensively() -> None:
    instance = facts({"Modality": ("CT \x00",)})
    assert parse_condition("Modality == CT").evaluate(instance)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param("Modality == CT", "Modality == CT", id="plain"),
        pytest.param("  Modality==CT  ", "Modality == CT", id="no-spaces"),
        pytest.param("(0008,0060) == CT", "Modality == CT", id="tag-to-keyword"),
        pytest.param("( 0008 , 0060 ) == CT", "Modality == CT", id="tag-with-spaces"),
        pytest.param("00080060 == CT", "Modality == CT", id="hex-tag"),
        pytest.param("(0019,10ab) == x", "(0019,10AB) == x", id="private-tag"),
        pytest.param("(6002,0010) > 2", "(6002,0010) > 2", id="repeating-group"),
        pytest.param("not   Modality == CT", "not Modality == CT", id="not"),
        pytest.param("Modality in CT , MR", "Modality in CT,MR", id="in-items-trimmed"),
        pytest.param(
            "StudyDescription matches ^A  B ", "StudyDescription matches ^A  B", id="rest"
        ),
        pytest.param("Modality == == x", "Modality == == x", id="value-is-rest"),
        pytest.param("Modality exists", "Modality exists", id="unary"),
        pytest.param("calling_aet == A B", "calling_aet == A B", id="value-with-space"),
        pytest.param(
            "LossyImageCompressionRatio < 1e2", "LossyImageCompressionRatio < 1e2", id="exp"
        ),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    cond = parse_condition(text)
    assert cond.text == canonical == str(cond)
    assert parse_condition(cond.text) == cond


def test_condition_fields() -> None:
    cond = parse_condition("not ReferencedImageSequence.ReferencedSOPClassUID like 1.2*")
    assert cond.field == FieldRef("sequence", 0x00081140, 0x00081150)
    assert (cond.op, cond.value, cond.negated) == ("like", "1.2*", True)
    assert parse_condition("Modality exists").field == FieldRef("tag", 0x00080060)
    assert parse_condition("peer_address exists").field == FieldRef("peer_address")


def test_condition_constructed_directly() -> None:
    cond = Condition(FieldRef("tag", 0x00080060), "==", "CT", negated=True)
    assert cond == parse_condition("not Modality == CT")
    with pytest.raises(RuleError, match="canonical"):
        Condition(FieldRef("tag", 0x00080060), "==", "CT", text="Modality==CT")


def test_condition_pickles() -> None:
    cond = parse_condition("StudyDate < 20240101")
    clone = pickle.loads(pickle.dumps(cond))
    assert clone == cond
    assert clone.evaluate(CT) is False


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "empty condition", id="empty"),
        pytest.param("Modalty == CT", "unknown keyword 'Modalty'.*Modality", id="unknown-keyword"),
        pytest.param("(0008,006) == CT", "bad tag", id="bad-tag-short"),
        pytest.param("(0008,00G0) == CT", "bad tag", id="bad-tag-not-hex"),
        pytest.param("0008006 == CT", "bad tag", id="bad-hex-tag"),
        pytest.param("(FFFE,E000) exists", "not attributes", id="item-tag"),
        pytest.param("Modality.CodeValue == x", "not a sequence", id="not-a-sequence"),
        pytest.param("ReferencedImageSequence == x", "is a sequence", id="bare-sequence"),
        pytest.param("A.B.C == x", "SEQUENCE.KEYWORD", id="nested-path"),
        pytest.param("PixelData exists", "binary VR", id="binary-vr"),
        pytest.param("StudyDescription matches (", "invalid regular expression", id="bad-regex"),
        pytest.param("peer_address in 10.0.0.0/33", "CIDR", id="bad-cidr"),
        pytest.param("peer_address in 10.0.0.0/8,nohost", "CIDR", id="bad-cidr-item"),
        pytest.param("peer_address == example.org", "bad address", id="bad-address"),
        pytest.param("peer_address < 10.0.0.1", "cannot be compared", id="peer-order"),
        pytest.param("calling_aet > A", "cannot be compared", id="ae-order"),
        pytest.param("StudyDate < 2024-01-01", "needs a date", id="bad-date-format"),
        pytest.param("StudyDate >= 20240230", "needs a date", id="bad-date-day"),
        pytest.param("StudyTime < 25", "needs a time", id="bad-time"),
        pytest.param("AcquisitionDateTime < 2024-01", "needs a date-time", id="bad-datetime"),
        pytest.param("Rows > many", "needs a number", id="bad-number"),
        pytest.param("AccessionNumber < A1", "needs a number", id="untyped-order-not-number"),
        pytest.param("Rows < nan", "needs a number", id="nan"),
        pytest.param("Modality ==", "missing value", id="missing-value"),
        pytest.param("Modality like   ", "missing value", id="missing-value-spaces"),
        pytest.param("Modality", "missing operator", id="missing-operator"),
        pytest.param("Modality = CT", "unknown operator '='", id="unknown-operator"),
        pytest.param("Modality LIKE CT", "unknown operator 'LIKE'", id="operator-case"),
        pytest.param("Modality likeCT", "unknown operator", id="operator-glued"),
        pytest.param("Modality exists CT", "takes no value", id="unary-with-value"),
        pytest.param("Modality in CT,,MR", "empty item", id="empty-list-item"),
        pytest.param("ImageType == ORIGINAL\\PRIMARY", "one at a time", id="backslash"),
        pytest.param("not not Modality == CT", "once", id="double-not"),
        pytest.param("== CT", "expected a field", id="no-field"),
    ],
)
def test_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        parse_condition(text)


def test_rule_error_is_value_error() -> None:
    assert issubclass(RuleError, ValueError)


# --------------------------------------------------------------------------- round trip

_KEYWORDS = ["Modality", "StudyDescription", "Rows", "SliceThickness", "StudyDate", "StudyTime"]
_VALUE_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\\")
_TYPED_VALUES = {
    "Rows": st.integers(0, 65535).map(str),
    "SliceThickness": st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
    "StudyDate": st.dates().map(lambda d: d.strftime("%Y%m%d")).filter(lambda s: len(s) == 8),
    "StudyTime": st.times().map(lambda t: t.strftime("%H%M%S.%f")),
}


@st.composite
def field_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["keyword", "paren", "hex", "private", "sequence", "peer"]))
    if kind == "peer":
        return draw(st.sampled_from(["calling_aet", "called_aet"]))
    if kind == "sequence":
        return "ReferencedImageSequence.ReferencedSOPInstanceUID"
    if kind == "private":
        group = draw(st.integers(0, 0x7FFF)) * 2 + 1
        return f"({group:04x},{draw(st.integers(0x1000, 0xFFFF)):04X})"
    tag_value = tag(draw(st.sampled_from(_KEYWORDS)))
    if kind == "paren":
        return f"({tag_value >> 16:04X},{tag_value & 0xFFFF:04x})"
    return f"{tag_value:08x}" if kind == "hex" else draw(st.sampled_from(_KEYWORDS))


@st.composite
def condition_texts(draw: st.DrawFn) -> str:
    field_text = draw(field_texts())
    op = draw(
        st.sampled_from(["==", "!=", "like", "matches", "in", "<", "<=", ">", ">=", "exists"])
    )
    not_ = draw(st.sampled_from(["", "not ", "not  "]))
    if op == "exists":
        return f"{not_}{field_text} {draw(st.sampled_from(['exists', 'missing']))}"
    if op in ("<", "<=", ">", ">="):
        keyword = draw(st.sampled_from(sorted(_TYPED_VALUES)))
        return f"{not_}{keyword} {op} {draw(_TYPED_VALUES[keyword])}"
    value = draw(st.text(_VALUE_CHARS, min_size=1, max_size=20))
    if op == "matches":
        value = draw(st.sampled_from([value, "^" + value, "(?i)" + value]))
    if op == "in":
        value = ", ".join(draw(st.lists(st.text(_VALUE_CHARS, min_size=1), min_size=1, max_size=4)))
    space = draw(st.sampled_from([" ", "  ", "\t"]))
    return f"{not_}{field_text}{space}{op}{space}{value}"


@given(condition_texts())
def test_round_trip(text: str) -> None:
    try:
        cond = parse_condition(text)
    except RuleError:
        reject()  # e.g. a drawn regex that does not compile, or an empty list item
    again = parse_condition(cond.text)
    assert again == cond
    assert again.text == cond.text


@given(st.text(string.printable + "éß", max_size=60))
def test_arbitrary_text_parses_or_raises_rule_error(text: str) -> None:
    try:
        cond = parse_condition(text)
    except RuleError:
        return
    assert parse_condition(cond.text) == cond


@given(
    st.lists(st.text(max_size=12), max_size=4),
    st.sampled_from([c for _, c, _, _ in CONDITION_CASES]),
    st.text(max_size=20),
)
def test_evaluation_never_raises(values: list[str], text: str, peer: str) -> None:
    cond = parse_condition(text)
    keys: list[int | tuple[int, int]] = [tag(k) for k in _KEYWORDS]
    keys += [tag("ImageType"), tag("AccessionNumber"), tag("AcquisitionDateTime")]
    keys.append((tag("ReferencedImageSequence"), tag("ReferencedSOPClassUID")))
    instance = InstanceFacts(dict.fromkeys(keys, tuple(values)), peer, peer, peer)
    assert isinstance(cond.evaluate(instance), bool)


# --------------------------------------------------------------------------- rule sets


def rule(
    name: str,
    *conditions: str,
    to: str = "",
    priority: int = 100,
    enabled: bool = True,
    stop: bool = False,
) -> RuleSpec:
    return RuleSpec(
        name,
        priority,
        enabled,
        stop,
        tuple(parse_condition(c) for c in conditions),
        tuple((to or name.upper()).split(",")),
    )


# (id, rules, facts, expected destinations, expected matched rule names)
RULESET_CASES: list[tuple[str, list[RuleSpec], InstanceFacts, tuple[str, ...], tuple[str, ...]]] = [
    (
        "no-conditions-match-all",
        [rule("all")],
        BARE,
        ("ALL",),
        ("all",),
    ),
    (
        "no-rules",
        [],
        CT,
        (),
        (),
    ),
    (
        "all-conditions-must-hold",
        [
            rule("ct-chest", "Modality == CT", "StudyDescription like CHEST*"),
            rule("mr", "Modality == MR"),
        ],
        CT,
        ("CT-CHEST",),
        ("ct-chest",),
    ),
    (
        "one-condition-fails",
        [rule("ct-chest", "Modality == CT", "StudyDescription like HEAD*")],
        CT,
        (),
        (),
    ),
    (
        "every-match-adds-in-priority-order",
        [
            rule("b", to="B", priority=20),
            rule("a", to="A", priority=10),
            rule("c", to="C", priority=30),
        ],
        CT,
        ("A", "B", "C"),
        ("a", "b", "c"),
    ),
    (
        "priority-ties-by-name",
        [
            rule("zeta", to="Z", priority=5),
            rule("alpha", to="A", priority=5),
            rule("mid", to="M", priority=1),
        ],
        CT,
        ("M", "A", "Z"),
        ("mid", "alpha", "zeta"),
    ),
    (
        "negative-priority-first",
        [rule("late", to="L", priority=0), rule("early", to="E", priority=-1)],
        CT,
        ("E", "L"),
        ("early", "late"),
    ),
    (
        "destinations-dedupe-first-seen",
        [rule("r1", to="PACS,AI", priority=1), rule("r2", to="AI,ARCHIVE,PACS", priority=2)],
        CT,
        ("PACS", "AI", "ARCHIVE"),
        ("r1", "r2"),
    ),
    (
        "disabled-not-evaluated",
        [rule("off", to="X", enabled=False), rule("on", to="Y")],
        CT,
        ("Y",),
        ("on",),
    ),
    (
        "stop-ends-evaluation",
        [rule("first", to="A", priority=1, stop=True), rule("second", to="B", priority=2)],
        CT,
        ("A",),
        ("first",),
    ),
    (
        "stop-only-when-matching",
        [
            rule("first", "Modality == MR", to="A", priority=1, stop=True),
            rule("second", to="B", priority=2),
        ],
        CT,
        ("B",),
        ("second",),
    ),
    (
        "disabled-stop-rule-does-not-stop",
        [
            rule("first", to="A", priority=1, stop=True, enabled=False),
            rule("second", to="B", priority=2),
        ],
        CT,
        ("B",),
        ("second",),
    ),
    (
        "ae-and-cidr",
        [
            rule("from-ct", "calling_aet in CT1,CT2", "peer_address in 10.0.0.0/8", to="CT"),
            rule("from-lan", "peer_address in 192.168.0.0/16", to="LAN"),
        ],
        MR,
        ("LAN",),
        ("from-lan",),
    ),
    (
        "negation-and-missing",
        [
            rule("not-ct", "not Modality == CT", to="NOTCT"),
            rule("no-acc", "AccessionNumber missing", to="NOACC"),
        ],
        MR,
        ("NOACC", "NOTCT"),  # same priority: by name
        ("no-acc", "not-ct"),
    ),
]


@pytest.mark.parametrize(
    ("specs", "instance", "destinations", "matched"),
    [pytest.param(r, f, d, m, id=i) for i, r, f, d, m in RULESET_CASES],
)
def test_ruleset(
    specs: list[RuleSpec],
    instance: InstanceFacts,
    destinations: tuple[str, ...],
    matched: tuple[str, ...],
) -> None:
    decision = RuleSet.compile(specs).match(instance)
    assert decision.destinations == destinations
    assert decision.matched == matched
    assert len(decision.explanations) == len(specs)


def test_explanations() -> None:
    rules = RuleSet.compile(
        [
            rule("a-off", priority=1, enabled=False),
            rule("b-fail", "Modality == CT", "(0008,1030) like HEAD*", priority=2),
            rule("c-stop", "calling_aet == CT1", priority=3, stop=True),
            rule("d-late", priority=4),
        ]
    )
    explained = [
        (e.rule, e.matched, e.failed_condition, e.skipped) for e in rules.match(CT).explanations
    ]
    assert explained == [
        ("a-off", False, None, True),
        ("b-fail", False, "StudyDescription like HEAD*", False),  # the canonical text
        ("c-stop", True, None, False),
        ("d-late", False, None, True),
    ]
    reasons = [e.reason for e in rules.match(CT).explanations]
    assert reasons[0] == "disabled"
    assert "c-stop" in reasons[3]


def test_wanted_tags() -> None:
    rules = RuleSet.compile(
        [
            rule("a", "Modality == CT", "calling_aet == X", "peer_address in 10.0.0.0/8"),
            rule("b", "ReferencedImageSequence.ReferencedSOPClassUID exists", "not Rows > 3"),
            rule("off", "StudyDate < 20240101", enabled=False),
        ]
    )
    assert rules.wanted_tags == frozenset({tag("Modality"), tag("Rows")})
    assert rules.wanted_sequence_tags == frozenset(
        {(tag("ReferencedImageSequence"), tag("ReferencedSOPClassUID"))}
    )
    assert [r.name for r in rules.rules] == ["a", "b", "off"]


def test_compile_rejects_duplicate_names() -> None:
    with pytest.raises(RuleError, match="duplicate"):
        RuleSet.compile([rule("same", priority=1), rule("same", priority=2)])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        pytest.param({"name": ""}, "bad rule name", id="empty-name"),
        pytest.param({"name": " x"}, "bad rule name", id="padded-name"),
        pytest.param({"destinations": ()}, "no destination", id="no-destination"),
        pytest.param({"destinations": ("A", "")}, "bad destination", id="empty-destination"),
        pytest.param({"conditions": ("Modality == CT",)}, "not a parsed Condition", id="str-cond"),
    ],
)
def test_rulespec_validation(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"name": "r", "priority": 1, "destinations": ("A",), **kwargs}
    with pytest.raises(RuleError, match=reason):
        RuleSpec(**args)  # type: ignore[arg-type]


def test_rulespec_accepts_lists() -> None:
    spec = RuleSpec("r", 1, conditions=[parse_condition("Modality exists")], destinations=["A"])  # type: ignore[arg-type]
    assert spec.conditions == (parse_condition("Modality exists"),)
    assert spec.destinations == ("A",)
