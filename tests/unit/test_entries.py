"""The registration entry: every rule on construction, and a strict wire form that round-trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from datetime import timedelta
from typing import Any

import pytest

from vouchd.entries import Entry, InvalidEntryError, default_entry_id
from vouchd.errors import VouchdError
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

TD = TrustDomain("example.org")
EK = "tpm:ek_hash:" + "ab" * 32
ANCHORED = "container:id, k8s:pod_uid, systemd:unit, unix:gid, unix:uid"


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def minimal(**changes: Any) -> Entry:
    fields: dict[str, Any] = {"id": "web", "spiffe_id": TD.spiffe_id("/web"),
                              "selectors": selector_set(["unix:uid:1000"])}
    fields.update(changes)
    return Entry(**fields)


FULL = Entry(
    id="web.frontend_1",
    spiffe_id=TD.spiffe_id("/web"),
    selectors=selector_set(["unix:uid:1000", "unix:path:/usr/bin/web"]),
    node_selectors=selector_set([EK, "node:label:role:web"]),
    min_tier=TrustTier.STATIC_SECRET,
    x509_ttl=timedelta(minutes=10),
    jwt_ttl=timedelta(minutes=5),
    dns_names=("web.example.org", "*.web.example.org"),
    hint="frontend",
    labels=Entry.label_pairs({"team": "web", "cost/centre": "42"}),
    revision=3,
    created_at=1_700_000_000,
    updated_at=1_700_000_500,
)

FULL_WIRE: dict[str, Any] = {
    "id": "web.frontend_1",
    "spiffe_id": "spiffe://example.org/web",
    "selectors": ["unix:path:/usr/bin/web", "unix:uid:1000"],
    "parent": None,
    "node_selectors": ["node:label:role:web", EK],
    "min_tier": "static-secret",
    "x509_ttl": 600,
    "jwt_ttl": 300,
    "dns_names": ["web.example.org", "*.web.example.org"],
    "hint": "frontend",
    "labels": {"cost/centre": "42", "team": "web"},
    "revision": 3,
    "created_at": 1_700_000_000,
    "updated_at": 1_700_000_500,
}


# --- defaults -----------------------------------------------------------------------------------


def test_an_entry_needs_only_id_spiffe_id_and_selectors() -> None:
    entry = minimal()

    assert (entry.parent, entry.node_selectors, entry.min_tier) == (None, frozenset(), TrustTier.HARDWARE)
    assert (entry.x509_ttl, entry.jwt_ttl, entry.dns_names, entry.hint, entry.labels) == (None, None, (), "", ())
    assert (entry.revision, entry.created_at, entry.updated_at) == (1, 0, 0)


def test_an_entry_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        minimal().hint = "changed"  # type: ignore[misc]


# --- the wire form ------------------------------------------------------------------------------


def test_the_wire_form_is_plain_json_with_sorted_selectors() -> None:
    assert FULL.to_wire() == FULL_WIRE
    assert json.loads(json.dumps(FULL.to_wire())) == FULL_WIRE


@pytest.mark.parametrize(
    "entry",
    [FULL, minimal(), minimal(parent=TD.spiffe_id("/vouchd/node/join/t1")),
     dataclasses.replace(FULL, node_selectors=frozenset(), parent=TD.spiffe_id("/node/1"), labels=(), hint="")],
    ids=["full", "minimal", "parent", "no-labels"],
)
def test_from_wire_reads_back_what_to_wire_wrote(entry: Entry) -> None:
    assert Entry.from_wire(json.loads(json.dumps(entry.to_wire()))) == entry


@pytest.mark.parametrize("field", list(FULL_WIRE))
def test_from_wire_names_a_missing_field(field: str) -> None:
    wire = {k: v for k, v in FULL_WIRE.items() if k != field}

    with pytest.raises(InvalidEntryError, match=exactly(f"{field}: is missing")):
        Entry.from_wire(wire)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", 7, "expected a non-empty string"),
        ("id", "", "expected a non-empty string"),
        ("spiffe_id", None, "expected a non-empty string"),
        ("spiffe_id", "https://example.org/web", "spiffe id 'https://example.org/web': scheme must be spiffe://"),
        ("selectors", "unix:uid:0", "expected a list of strings"),
        ("selectors", ["unix:uid:0", 5], "expected a list of strings"),
        ("parent", 5, "expected a non-empty string"),
        ("parent", "node-1", "spiffe id 'node-1': scheme must be spiffe://"),
        ("node_selectors", None, "expected a list of strings"),
        ("min_tier", "gold", "expected one of hardware, static-secret, got 'gold'"),
        ("min_tier", 1, "expected a non-empty string"),
        ("x509_ttl", "10m", "expected an integer"),
        ("x509_ttl", 1.5, "expected an integer"),
        ("x509_ttl", True, "expected an integer"),
        ("x509_ttl", 10**20, "out of range"),
        ("jwt_ttl", "5m", "expected an integer"),
        ("jwt_ttl", 0, "must be whole seconds, at least 1s"),
        ("dns_names", "web.example.org", "expected a list of strings"),
        ("hint", None, "expected a string"),
        ("labels", [["team", "web"]], "expected an object of strings"),
        ("labels", {"team": 1}, "expected an object of strings"),
        ("revision", "3", "expected an integer"),
        ("revision", False, "expected an integer"),
        ("revision", 0, "must be 1 or more"),
        ("created_at", None, "expected an integer"),
        ("updated_at", 1.0, "expected an integer"),
    ],
)
def test_from_wire_names_a_field_of_the_wrong_type(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidEntryError, match=exactly(f"{field}: {message}")):
        Entry.from_wire({**FULL_WIRE, field: value})


def test_from_wire_names_the_selector_that_is_not_one() -> None:
    wire = {**FULL_WIRE, "node_selectors": [EK, "label"]}

    with pytest.raises(InvalidEntryError,
                       match=exactly("node_selectors[1]: selector 'label' is not of the form type:key:value")):
        Entry.from_wire(wire)


def test_from_wire_refuses_unknown_fields() -> None:
    with pytest.raises(InvalidEntryError, match=exactly("priority: unknown field")):
        Entry.from_wire({**FULL_WIRE, "priority": 1, "zeta": 2})


@pytest.mark.parametrize("data", [None, [], "entry", 1])
def test_from_wire_wants_an_object(data: object) -> None:
    with pytest.raises(InvalidEntryError, match=exactly("entry: expected an object")):
        Entry.from_wire(data)


def test_from_wire_applies_the_rules_of_the_model() -> None:
    wire = {**FULL_WIRE, "selectors": ["unix:path:/usr/bin/web"]}

    with pytest.raises(InvalidEntryError, match=exactly(f"selectors: needs at least one kernel-anchored selector "
                                                        f"({ANCHORED})")):
        Entry.from_wire(wire)


# --- the rules ----------------------------------------------------------------------------------

ID_RULE = "expected 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
LABEL_KEY_RULE = "label keys are 1 to 63 letters, digits, '.', '_', '/' or '-', starting with a letter or digit"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"id": ""}, "id", ID_RULE),
        ({"id": "-web"}, "id", ID_RULE),
        ({"id": "has space"}, "id", ID_RULE),
        ({"id": "web\n"}, "id", ID_RULE),
        ({"id": "a" * 129}, "id", ID_RULE),
        ({"selectors": frozenset(Selector("unix", "uid", str(n)) for n in range(65))},
         "selectors", "at most 64 selectors"),
        ({"node_selectors": frozenset(Selector("node", "label", f"k:{n}") for n in range(65))},
         "node_selectors", "at most 64 selectors"),
        ({"spiffe_id": TD.id}, "spiffe_id", "a workload's SPIFFE ID needs a path, e.g. spiffe://example.org/web"),
        ({"spiffe_id": TD.spiffe_id("/vouchd/authority")}, "spiffe_id",
         "paths under /vouchd/ are reserved for vouchd itself"),
        ({"selectors": frozenset()}, "selectors", "an entry needs at least one selector"),
        ({"selectors": selector_set(["unix:path:/usr/bin/web"])}, "selectors",
         f"needs at least one kernel-anchored selector ({ANCHORED})"),
        ({"parent": TD.spiffe_id("/node/1"), "node_selectors": selector_set([EK])}, "node_selectors",
         "an entry has either a parent or node_selectors, not both"),
        ({"node_selectors": selector_set(["tpm:ek_issuer_cn:Acme"])}, "node_selectors",
         "must include tpm:ek_hash or a node:label selector"),
        ({"x509_ttl": timedelta(0)}, "x509_ttl", "must be whole seconds, at least 1s"),
        ({"x509_ttl": timedelta(milliseconds=500)}, "x509_ttl", "must be whole seconds, at least 1s"),
        ({"x509_ttl": timedelta(milliseconds=1500)}, "x509_ttl", "must be whole seconds, at least 1s"),
        ({"x509_ttl": timedelta(seconds=-60)}, "x509_ttl", "must be whole seconds, at least 1s"),
        ({"jwt_ttl": timedelta(milliseconds=999)}, "jwt_ttl", "must be whole seconds, at least 1s"),
        ({"dns_names": ("web.example.org", "not a name")}, "dns_names[1]",
         "dns name 'not a name' is not a valid dns name"),
        ({"hint": "h" * 257}, "hint", "at most 256 characters"),
        ({"labels": (("team", "web"), ("app", "x"))}, "labels",
         "expected sorted pairs with unique keys (use Entry.label_pairs)"),
        ({"labels": (("team", "a"), ("team", "b"))}, "labels",
         "expected sorted pairs with unique keys (use Entry.label_pairs)"),
        ({"labels": (("", "x"),)}, "labels.", LABEL_KEY_RULE),
        ({"labels": (("-team", "x"),)}, "labels.-team", LABEL_KEY_RULE),
        ({"labels": (("team\n", "x"),)}, "labels.team\n", LABEL_KEY_RULE),
        ({"labels": (("k" * 64, "x"),)}, f"labels.{'k' * 40}", LABEL_KEY_RULE),
        ({"labels": (("team", "v" * 257),)}, "labels.team", "at most 256 characters"),
        ({"revision": 0}, "revision", "must be 1 or more"),
    ],
)
def test_an_entry_that_breaks_a_rule_cannot_be_made(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidEntryError) as caught:
        minimal(**changes)

    assert (caught.value.field, caught.value.reason) == (field, message)
    assert str(caught.value) == f"{field}: {message}"


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "a" * 128},
        {"id": "0.web_1-x"},
        {"selectors": frozenset(Selector("unix", "uid", str(n)) for n in range(64))},
        {"x509_ttl": timedelta(seconds=1), "jwt_ttl": timedelta(days=30)},
        {"hint": "h" * 256},
        {"labels": Entry.label_pairs({"k" * 63: "v" * 256, "a/b.c_d-e": ""})},
        {"node_selectors": selector_set(["node:label:role:web", "tpm:ek_issuer_cn:Acme"])},
        {"parent": TD.spiffe_id("/vouchd/node/join/t1")},
    ],
)
def test_the_limits_themselves_are_allowed(changes: dict[str, Any]) -> None:
    entry = minimal(**changes)

    assert Entry.from_wire(entry.to_wire()) == entry


def test_invalid_entry_errors_are_vouchd_errors() -> None:
    assert issubclass(InvalidEntryError, VouchdError)


# --- helpers ------------------------------------------------------------------------------------


def test_the_default_id_depends_on_spiffe_id_and_selectors_not_their_order() -> None:
    web = SpiffeId.parse("spiffe://example.org/web")
    first = default_entry_id(web, selector_set(["unix:uid:0", "unix:gid:0"]))

    assert re.fullmatch(r"e-[0-9a-f]{16}", first)
    assert default_entry_id(web, [Selector("unix", "gid", "0"), Selector("unix", "uid", "0")]) == first
    assert default_entry_id(TD.spiffe_id("/db"), selector_set(["unix:uid:0", "unix:gid:0"])) != first
    assert default_entry_id(web, selector_set(["unix:uid:0"])) != first
    # Pinned: configuration files imported before this model must keep their entries' ids.
    assert default_entry_id(web, selector_set(["unix:uid:0"])) == "e-" + hashlib.sha256(
        b"spiffe://example.org/web\nunix:uid:0").hexdigest()[:16]


def test_same_content_ignores_revision_and_timestamps_only() -> None:
    later = dataclasses.replace(FULL, revision=9, created_at=1, updated_at=2)

    assert FULL.same_content(later)
    assert not FULL.same_content(dataclasses.replace(later, hint="other"))
    assert not FULL.same_content(dataclasses.replace(later, labels=()))


def test_labels_are_kept_as_sorted_pairs() -> None:
    pairs = Entry.label_pairs({"team": "web", "app": "shop"})

    assert pairs == (("app", "shop"), ("team", "web"))
    assert minimal(labels=pairs).label_map == {"app": "shop", "team": "web"}
