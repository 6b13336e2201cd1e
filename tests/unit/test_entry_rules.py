"""Which selectors can exist (SelectorSchema, the node selector schema) and the rules every entry obeys."""

from __future__ import annotations

import pytest

from vouchd.entry_rules import (
    NODE_SELECTOR_SCHEMA,
    EntryRuleViolation,
    entry_selectors_violation,
    entry_violation,
    selector_violation,
)
from vouchd.selectors import (
    InvalidSelectorError,
    Selector,
    SelectorKind,
    SelectorSchema,
    absolute_path,
    decimal_id,
    matching,
    non_empty,
)
from vouchd.spiffe import TrustDomain

TD = TrustDomain("example.org")
EK_HASH = "ab" * 32
ANCHORED = "container:id, k8s:pod_uid, systemd:unit, unix:gid, unix:uid"

# A small workload schema of its own, so these tests do not depend on what the unix attestor declares.
ENABLED = "a selector any enabled attestor produces"
SCHEMA = SelectorSchema(
    {
        "unix": (
            SelectorKind("unix", "uid", decimal_id("a uid is a number")),
            SelectorKind("unix", "path", absolute_path("a path is absolute")),
        ),
        "container": (
            SelectorKind("container", "id", matching(r"[0-9a-f]{12,64}", "a container id is hex")),
            SelectorKind("k8s", "pod_uid", non_empty("a pod uid is not empty")),
        ),
        "mesh": None,  # declared nothing: a third-party plugin
    },
    described_as=ENABLED,
)


def selectors(*texts: str) -> list[Selector]:
    return [Selector.parse(text) for text in texts]


# --- SelectorSchema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["unix:uid:0", "unix:uid:1000", "unix:uid:4294967294", "unix:path:/usr/bin/web", "container:id:0123456789ab",
     "k8s:pod_uid:8f1c-22", "mesh:anything:at all", "mesh:x:"],
)
def test_a_schema_accepts_what_its_producers_emit(text: str) -> None:
    assert SCHEMA.problem(Selector.parse(text)) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("unix:pth:/x", f"unix:pth is not {ENABLED} (unix produces: path, uid)"),
        ("unix:uidd:0", f"unix:uidd is not {ENABLED} (unix produces: path, uid)"),
        ("k8s:pod_id:x", f"k8s:pod_id is not {ENABLED} (container produces: pod_uid)"),
        ("systemd:unit:web.service", f"systemd:unit is not {ENABLED} (known types: container, k8s, mesh, unix)"),
        ("unix:uid:abc", "unix:uid:abc: a uid is a number"),
        ("unix:uid:-1", "unix:uid:-1: a uid is a number"),
        ("unix:uid:+1", "unix:uid:+1: a uid is a number"),
        ("unix:uid: 0", "unix:uid: 0: a uid is a number"),
        ("unix:uid:0 ", "unix:uid:0 : a uid is a number"),
        ("unix:uid:007", "unix:uid:007: a uid is a number"),
        ("unix:uid:", "unix:uid:: a uid is a number"),
        ("unix:uid:4294967295", "unix:uid:4294967295: a uid is a number"),
        ("unix:uid:99999999999", "unix:uid:99999999999: a uid is a number"),
        ("unix:uid:\u0661", "unix:uid:\u0661: a uid is a number"),  # an Arabic-Indic one: a digit, not decimal ASCII
        ("unix:uid:0\n", "unix:uid:0\n: a uid is a number"),
        ("unix:path:usr/bin/web", "unix:path:usr/bin/web: a path is absolute"),
        ("unix:path:/usr//bin/web", "unix:path:/usr//bin/web: a path is absolute"),
        ("unix:path://usr/bin/web", "unix:path://usr/bin/web: a path is absolute"),
        ("unix:path:/usr/bin/../bin/web", "unix:path:/usr/bin/../bin/web: a path is absolute"),
        ("unix:path:/usr/bin/./web", "unix:path:/usr/bin/./web: a path is absolute"),
        ("unix:path:/usr/bin/", "unix:path:/usr/bin/: a path is absolute"),
        ("unix:path:/", "unix:path:/: a path is absolute"),
        ("container:id:XYZ", "container:id:XYZ: a container id is hex"),
        ("k8s:pod_uid:", "k8s:pod_uid:: a pod uid is not empty"),
    ],
)
def test_a_schema_names_what_no_producer_emits(text: str, problem: str) -> None:
    assert SCHEMA.problem(Selector.parse(text)) == problem


def test_a_long_selector_is_shortened_in_the_message() -> None:
    selector = Selector("unix", "uid", "9" * 500)

    assert SCHEMA.problem(selector) == f"unix:uid:{'9' * 88}...: a uid is a number"


def test_a_producer_that_declared_nothing_owns_only_its_own_type() -> None:
    schema = SelectorSchema({"mesh": None}, described_as=ENABLED)

    assert schema.problem(Selector("mesh", "any", "thing")) is None
    assert schema.problem(Selector("unix", "uid", "0")) == f"unix:uid is not {ENABLED} (known types: mesh)"
    assert schema.types == frozenset({"mesh"})


def test_an_undeclared_producer_opens_its_own_type_and_no_other() -> None:
    uid = SelectorKind("unix", "uid", decimal_id("a uid is a number"))
    beside = SelectorSchema({"unix": (uid,), "mesh": None}, described_as=ENABLED)
    named_unix = SelectorSchema({"decl": (uid,), "unix": None}, described_as=ENABLED)

    assert beside.problem(Selector("unix", "uid", "x")) == "unix:uid:x: a uid is a number"
    assert named_unix.problem(Selector("unix", "uid", "x")) is None  # the plugin named unix may emit anything


def test_a_value_is_accepted_when_any_producer_of_its_key_accepts_it() -> None:
    schema = SelectorSchema(
        {"a": (SelectorKind("k8s", "pod_uid", matching("[0-9]+", "digits")),),
         "b": (SelectorKind("k8s", "pod_uid", matching("[a-f]+", "letters")),
               SelectorKind("k8s", "ns", non_empty("x")))},
        described_as=ENABLED,
    )

    assert schema.problem(Selector("k8s", "pod_uid", "12")) is None
    assert schema.problem(Selector("k8s", "pod_uid", "ab")) is None
    assert schema.problem(Selector("k8s", "pod_uid", "zz")) == "k8s:pod_uid:zz: digits"
    assert schema.problem(Selector("k8s", "name", "web")) == (
        f"k8s:name is not {ENABLED} (a produces: pod_uid; b produces: ns, pod_uid)"
    )


def test_a_schema_of_no_producers_accepts_nothing() -> None:
    schema = SelectorSchema({}, described_as=ENABLED)

    assert schema.problem(Selector("unix", "uid", "0")) == f"unix:uid is not {ENABLED} (known types: none)"


@pytest.mark.parametrize(("selector_type", "key"), [("", "uid"), ("unix", ""), ("un:ix", "uid"), ("unix", "u:id")])
def test_a_selector_kind_has_the_shape_of_a_selector(selector_type: str, key: str) -> None:
    with pytest.raises(InvalidSelectorError, match=r"^selector (type|key) must be non-empty and contain no colon$"):
        SelectorKind(selector_type, key)


def test_a_kind_without_a_check_takes_any_value() -> None:
    schema = SelectorSchema({"x": (SelectorKind("x", "free"),)}, described_as=ENABLED)

    assert schema.problem(Selector("x", "free", "")) is None
    assert schema.problem(Selector("x", "free", " anything: at all ")) is None


# --- the node selector schema -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [f"tpm:ek_hash:{EK_HASH}", "tpm:ek_issuer_cn:Acme TPM CA", "tpm:pcr_profile:none",
     f"tpm:pcr_profile:learned-{EK_HASH[:12]}", f"tpm:pcr_profile:a{'b' * 63}", "tpm:pcr_profile:v1.2_x",
     "node:tier:hardware", "node:tier:static-secret", "node:label:role:web", "node:label:zone:eu:west"],
)
def test_the_node_schema_accepts_what_the_authority_gives_nodes(text: str) -> None:
    assert NODE_SELECTOR_SCHEMA.problem(Selector.parse(text)) is None


EK_HASH_PROBLEM = "an ek_hash is 64 lowercase hex digits, as at the end of the node's SPIFFE ID"
PROFILE_PROBLEM = ("a pcr_profile is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                   "e.g. tpm:pcr_profile:baseline")
LABEL_PROBLEM = "a node label is KEY:VALUE, e.g. node:label:role:web"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tpm:ek_hsh:x", "tpm:ek_hsh is not a node selector (tpm produces: ek_hash, ek_issuer_cn, pcr_profile)"),
        ("node:labels:a:b", "node:labels is not a node selector (node produces: key_hash, label, tier)"),
        ("unix:uid:0", "unix:uid is not a node selector (known types: node, tpm)"),
        (f"tpm:ek_hash:{EK_HASH.upper()}", f"tpm:ek_hash:{EK_HASH.upper()}: {EK_HASH_PROBLEM}"),
        (f"tpm:ek_hash:{EK_HASH[:-1]}", f"tpm:ek_hash:{EK_HASH[:-1]}: {EK_HASH_PROBLEM}"),
        (f"tpm:ek_hash:{EK_HASH}0", f"tpm:ek_hash:{EK_HASH}0: {EK_HASH_PROBLEM}"),
        (f"tpm:ek_hash:{EK_HASH}\n", f"tpm:ek_hash:{EK_HASH}\n: {EK_HASH_PROBLEM}"),
        ("tpm:ek_issuer_cn:", "tpm:ek_issuer_cn:: an ek_issuer_cn is the common name of the EK certificate's "
                              "issuer, e.g. tpm:ek_issuer_cn:Acme TPM CA"),
        ("tpm:pcr_profile:", f"tpm:pcr_profile:: {PROFILE_PROBLEM}"),
        ("tpm:pcr_profile:-x", f"tpm:pcr_profile:-x: {PROFILE_PROBLEM}"),
        ("tpm:pcr_profile:a b", f"tpm:pcr_profile:a b: {PROFILE_PROBLEM}"),
        (f"tpm:pcr_profile:a{'b' * 64}", f"tpm:pcr_profile:a{'b' * 64}: {PROFILE_PROBLEM}"),
        ("node:tier:gold", "node:tier:gold: a tier is one of hardware, static-secret, e.g. node:tier:hardware"),
        ("node:tier:Hardware", "node:tier:Hardware: a tier is one of hardware, static-secret, e.g. node:tier:hardware"),
        ("node:label:role", f"node:label:role: {LABEL_PROBLEM}"),
        ("node:label::web", f"node:label::web: {LABEL_PROBLEM}"),
        ("node:label:role:", f"node:label:role:: {LABEL_PROBLEM}"),
    ],
)
def test_the_node_schema_names_what_no_node_has(text: str, problem: str) -> None:
    assert NODE_SELECTOR_SCHEMA.problem(Selector.parse(text)) == problem


# --- selector_violation, entry_selectors_violation ----------------------------------------------


def test_the_first_selector_no_producer_emits_is_named_by_its_index() -> None:
    violation = selector_violation(selectors("unix:uid:0", "unix:pth:/x", "unix:uid:abc"), SCHEMA)

    assert violation == ("selectors[1]", f"unix:pth is not {ENABLED} (unix produces: path, uid)")
    assert isinstance(violation, EntryRuleViolation)
    assert (violation.field, violation.message) == violation


def test_selector_violation_takes_the_field_to_name() -> None:
    violation = selector_violation(selectors(f"tpm:ek_hash:{EK_HASH}", "node:tier:gold"), NODE_SELECTOR_SCHEMA,
                                   field="node_selectors")

    assert violation == ("node_selectors[1]",
                         "node:tier:gold: a tier is one of hardware, static-secret, e.g. node:tier:hardware")


def test_selectors_every_producer_emits_are_no_violation() -> None:
    assert selector_violation(selectors("unix:uid:0", "unix:path:/bin/true", "mesh:a:b"), SCHEMA) is None
    assert selector_violation([], SCHEMA) is None


@pytest.mark.parametrize(
    ("workload", "node", "violation"),
    [
        (("unix:uid:0",), (f"tpm:ek_hash:{EK_HASH}",), None),
        (("unix:uid:0",), (), None),
        (("unix:uid:x",), ("tpm:ek_hash:x",), ("selectors[0]", "unix:uid:x: a uid is a number")),
        (("unix:uid:0",), ("node:label:role:web", "tpm:ek_hash:x"),
         ("node_selectors[1]", f"tpm:ek_hash:x: {EK_HASH_PROBLEM}")),
        (("unix:uid:0",), ("unix:uid:0",), ("node_selectors[0]", "unix:uid is not a node selector "
                                                                 "(known types: node, tpm)")),
    ],
)
def test_entry_selectors_are_checked_workload_first_then_node(
    workload: tuple[str, ...], node: tuple[str, ...], violation: tuple[str, str] | None
) -> None:
    assert entry_selectors_violation(selectors(*workload), selectors(*node), SCHEMA) == violation


def test_a_typo_in_the_only_anchor_is_named_as_a_typo() -> None:
    typo = selectors("unix:uidd:1000")

    # entry_violation alone can only say that an anchor is missing; the schema says why.
    assert entry_violation(TD.spiffe_id("/web"), typo, None, ()) == (
        "selectors", f"needs at least one kernel-anchored selector ({ANCHORED})")
    assert entry_selectors_violation(typo, (), SCHEMA) == (
        "selectors[0]", f"unix:uidd is not {ENABLED} (unix produces: path, uid)")


# --- entry_violation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "workload", "parent", "node", "violation"),
    [
        ("/web", ("unix:uid:0",), None, (), None),
        ("/web", ("unix:path:/x", "systemd:unit:web.service"), None, (), None),
        ("/web", ("container:id:abc",), None, ("node:label:role:web",), None),
        ("/web", ("k8s:pod_uid:1",), "/vouchd/node/join/t", (), None),
        ("", ("unix:uid:0",), None, (), ("spiffe_id", "a workload's SPIFFE ID needs a path, e.g. "
                                                     "spiffe://example.org/web")),
        ("/vouchd/x", ("unix:uid:0",), None, (), ("spiffe_id", "paths under /vouchd/ are reserved for vouchd itself")),
        ("/vouchd", ("unix:uid:0",), None, (), ("spiffe_id", "paths under /vouchd/ are reserved for vouchd itself")),
        ("/web", (), None, (), ("selectors", "an entry needs at least one selector")),
        ("/web", ("unix:path:/x", "unix:sha256:ab"), None, (),
         ("selectors", f"needs at least one kernel-anchored selector ({ANCHORED})")),
        ("/web", ("unix:uid:0",), "/vouchd/node/join/t", ("node:label:a:b",),
         ("node_selectors", "an entry has either a parent or node_selectors, not both")),
        ("/web", ("unix:uid:0",), None, ("tpm:ek_issuer_cn:Acme", "node:tier:hardware"),
         ("node_selectors", "must include tpm:ek_hash or a node:label selector")),
    ],
)
def test_entry_violation_names_the_first_rule_broken(
    path: str, workload: tuple[str, ...], parent: str | None, node: tuple[str, ...],
    violation: tuple[str, str] | None,
) -> None:
    spiffe_id = TD.spiffe_id(path) if path else TD.id
    parent_id = TD.spiffe_id(parent) if parent else None

    assert entry_violation(spiffe_id, selectors(*workload), parent_id, selectors(*node)) == violation
