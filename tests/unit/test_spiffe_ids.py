"""SPIFFE ID and trust domain parsing, per spiffe/spiffe standards/SPIFFE-ID.md."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vouchd.spiffe import InvalidSpiffeIdError, SpiffeId, TrustDomain

MAX_ID = 2048
PREFIX = "spiffe://example.org/"


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


VALID_IDS = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/path", "example.org", "/path"),
    ("spiffe://example.org/a/b/c", "example.org", "/a/b/c"),
    ("spiffe://a-b_c.d0/x.y-z_0", "a-b_c.d0", "/x.y-z_0"),
    ("spiffe://example.org/Mixed/CASE", "example.org", "/Mixed/CASE"),
    ("spiffe://example.org/..a/.b/c..", "example.org", "/..a/.b/c.."),
    ("spiffe://127.0.0.1/x", "127.0.0.1", "/x"),
    ("spiffe://example.org/vouchd/node/tpm/ab12", "example.org", "/vouchd/node/tpm/ab12"),
    (PREFIX + "a" * (MAX_ID - len(PREFIX)), "example.org", "/" + "a" * (MAX_ID - len(PREFIX))),
]

TD_CHARS = "trust domain characters are limited to lowercase letters, numbers, dots, dashes and underscores"
SEGMENT_CHARS = "path segment characters are limited to letters, numbers, dots, dashes and underscores"

INVALID_IDS = [
    ("", "spiffe id is empty"),
    ("example.org/path", "spiffe id 'example.org/path': scheme must be spiffe://"),
    ("http://example.org/x", "spiffe id 'http://example.org/x': scheme must be spiffe://"),
    ("SPIFFE://example.org/x", "spiffe id 'SPIFFE://example.org/x': scheme must be spiffe://"),
    ("spiffe:/example.org/x", "spiffe id 'spiffe:/example.org/x': scheme must be spiffe://"),
    (" spiffe://example.org/x", "spiffe id ' spiffe://example.org/x': scheme must be spiffe://"),
    ("spiffe://", "spiffe id 'spiffe://': trust domain is missing"),
    ("spiffe:///path", "spiffe id 'spiffe:///path': trust domain is missing"),
    ("spiffe://Example.org/x", f"spiffe id 'spiffe://Example.org/x': {TD_CHARS}"),
    ("spiffe://exa mple.org", f"spiffe id 'spiffe://exa mple.org': {TD_CHARS}"),
    ("spiffe://ex\u00e4mple.org", f"spiffe id 'spiffe://ex\u00e4mple.org': {TD_CHARS}"),
    ("spiffe://user@example.org/x", "spiffe id 'spiffe://user@example.org/x': userinfo is not allowed"),
    ("spiffe://example.org:8080/x", "spiffe id 'spiffe://example.org:8080/x': port is not allowed"),
    ("spiffe://example.org:/x", "spiffe id 'spiffe://example.org:/x': port is not allowed"),
    (
        "spiffe://example.org/x?y=1",
        "spiffe id 'spiffe://example.org/x?y=1': query and fragment are not allowed",
    ),
    ("spiffe://example.org/x#f", "spiffe id 'spiffe://example.org/x#f': query and fragment are not allowed"),
    ("spiffe://example.org?", "spiffe id 'spiffe://example.org?': query and fragment are not allowed"),
    ("spiffe://example.org/%41", "spiffe id 'spiffe://example.org/%41': percent-encoding is not allowed"),
    ("spiffe://example.org/", "spiffe id 'spiffe://example.org/': path cannot have a trailing slash"),
    ("spiffe://example.org/a/", "spiffe id 'spiffe://example.org/a/': path cannot have a trailing slash"),
    ("spiffe://example.org//a", "spiffe id 'spiffe://example.org//a': path cannot contain empty segments"),
    (
        "spiffe://example.org/a//b",
        "spiffe id 'spiffe://example.org/a//b': path cannot contain empty segments",
    ),
    ("spiffe://example.org/./a", "spiffe id 'spiffe://example.org/./a': path cannot contain dot segments"),
    ("spiffe://example.org/a/..", "spiffe id 'spiffe://example.org/a/..': path cannot contain dot segments"),
    ("spiffe://example.org/a b", f"spiffe id 'spiffe://example.org/a b': {SEGMENT_CHARS}"),
    ("spiffe://example.org/a*b", f"spiffe id 'spiffe://example.org/a*b': {SEGMENT_CHARS}"),
    ("spiffe://example.org/\u00e9", f"spiffe id 'spiffe://example.org/\u00e9': {SEGMENT_CHARS}"),
    ("spiffe://example.org/a\\b", f"spiffe id 'spiffe://example.org/a\\\\b': {SEGMENT_CHARS}"),
    (PREFIX + "a" * (MAX_ID - len(PREFIX) + 1), "spiffe id longer than 2048 bytes"),
    (
        "spiffe://" + "a" * 256,
        "spiffe id 'spiffe://" + "a" * 71 + "'...: trust domain is longer than 255 bytes",
    ),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), VALID_IDS)
def test_valid_spiffe_ids_parse_into_trust_domain_and_path(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)

    assert spiffe_id.trust_domain == TrustDomain(trust_domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text


@pytest.mark.parametrize(("text", "message"), INVALID_IDS)
def test_invalid_spiffe_ids_are_refused_with_the_rule_they_break(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as caught:
        SpiffeId.parse(text)

    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("a", "spiffe id path 'a': path must start with a slash"),
        ("/", "spiffe id path '/': path cannot have a trailing slash"),
        ("/a//b", "spiffe id path '/a//b': path cannot contain empty segments"),
        ("/..", "spiffe id path '/..': path cannot contain dot segments"),
        ("/a?b", f"spiffe id path '/a?b': {SEGMENT_CHARS}"),
    ],
)
def test_constructing_a_spiffe_id_validates_the_path(path: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as caught:
        SpiffeId(TrustDomain("example.org"), path)

    assert str(caught.value) == message


def test_constructing_a_spiffe_id_enforces_the_total_length() -> None:
    td = TrustDomain("example.org")
    longest = "/" + "a" * (MAX_ID - len("spiffe://example.org/"))

    assert len(str(td.spiffe_id(longest))) == MAX_ID
    with pytest.raises(InvalidSpiffeIdError, match=exactly("spiffe id longer than 2048 bytes")):
        td.spiffe_id(longest + "a")


def test_a_spiffe_id_needs_a_trust_domain_object_not_a_string() -> None:
    with pytest.raises(InvalidSpiffeIdError, match=exactly("spiffe id trust domain must be a TrustDomain")):
        SpiffeId("example.org", "/x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "trust domain is empty"),
        ("Example.org", f"trust domain 'Example.org': {TD_CHARS[len('trust domain ') :]}"),
        ("example.org/x", f"trust domain 'example.org/x': {TD_CHARS[len('trust domain ') :]}"),
        ("spiffe://example.org", f"trust domain 'spiffe://example.org': {TD_CHARS[len('trust domain ') :]}"),
    ],
)
def test_trust_domain_names_are_validated_on_construction(name: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as caught:
        TrustDomain(name)

    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["example.org", "spiffe://example.org"])
def test_trust_domain_parse_accepts_a_name_or_the_trust_domain_id(text: str) -> None:
    assert TrustDomain.parse(text) == TrustDomain("example.org")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spiffe://example.org/x", "trust domain 'spiffe://example.org/x': must not have a path"),
        ("https://example.org", "spiffe id 'https://example.org': scheme must be spiffe://"),
        ("spiffe://example.org:1", "spiffe id 'spiffe://example.org:1': port is not allowed"),
        ("EXAMPLE.ORG", f"trust domain 'EXAMPLE.ORG': {TD_CHARS[len('trust domain ') :]}"),
    ],
)
def test_trust_domain_parse_refuses_anything_but_a_trust_domain(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as caught:
        TrustDomain.parse(text)

    assert str(caught.value) == message


def test_trust_domain_id_and_member_ids() -> None:
    td = TrustDomain("example.org")
    other = TrustDomain("other.org")

    assert str(td) == "example.org"
    assert td.id == SpiffeId(td, "")
    assert str(td.id) == "spiffe://example.org"
    assert str(td.spiffe_id("/vouchd/node/tpm/ab12")) == "spiffe://example.org/vouchd/node/tpm/ab12"
    assert td.spiffe_id("/x").is_member_of(td)
    assert td.id.is_member_of(td)
    assert not td.spiffe_id("/x").is_member_of(other)


def test_spiffe_ids_are_never_equal_to_strings() -> None:
    spiffe_id: object = SpiffeId.parse("spiffe://example.org/a")
    trust_domain: object = TrustDomain("example.org")

    assert spiffe_id != "spiffe://example.org/a"
    assert trust_domain != "example.org"
    assert len({spiffe_id, "spiffe://example.org/a"}) == 2


def test_equal_spiffe_ids_hash_equal_and_sort_by_trust_domain_then_path() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")

    assert a == SpiffeId.parse("spiffe://example.org/a")
    assert hash(a) == hash(SpiffeId(TrustDomain("example.org"), "/a"))
    assert sorted(SpiffeId.parse(s) for s in ["spiffe://b.org/a", "spiffe://example.org/b", "spiffe://a.org/z"]) == [
        SpiffeId.parse("spiffe://a.org/z"),
        SpiffeId.parse("spiffe://b.org/a"),
        SpiffeId.parse("spiffe://example.org/b"),
    ]


def test_reprs_show_the_id() -> None:
    assert repr(SpiffeId.parse("spiffe://example.org/a")) == "SpiffeId('spiffe://example.org/a')"
    assert repr(TrustDomain("example.org")) == "TrustDomain('example.org')"


_td_names = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
_segments = st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@given(_td_names, st.lists(_segments, max_size=6))
def test_every_valid_id_round_trips_through_its_string(td_name: str, segments: list[str]) -> None:
    spiffe_id = SpiffeId(TrustDomain(td_name), "".join("/" + s for s in segments))

    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@given(st.one_of(st.text(max_size=80), st.text(max_size=60).map(lambda s: "spiffe://" + s)))
def test_parse_either_accepts_text_verbatim_or_raises_invalid_spiffe_id(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeIdError:
        return
    # Never normalised: an accepted ID prints back as exactly the text it came from.
    assert str(spiffe_id) == text
