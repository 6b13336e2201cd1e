"""A standalone host binds only the entries that name no node to its own TPM.

An entry the file binds to a parent or to node selectors keeps that binding: binding it to the
local EK instead would hand the local node identities the operator meant for other nodes.
"""

from __future__ import annotations

import pytest

from vouchd.entries import Entry
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId
from vouchd.standalone import standalone_entries

LOCAL_EK = "1" * 64
OTHER_EK = "2" * 64


def entry(name: str, **binding: object) -> Entry:
    return Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
                 selectors=selector_set(["unix:uid:1000"]), **binding)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bound",
    [
        entry("by-label", node_selectors=selector_set(["node:label:role:db"])),
        entry("by-other-ek", node_selectors=selector_set([f"tpm:ek_hash:{OTHER_EK}"])),
        entry("by-parent", parent=SpiffeId.parse(f"spiffe://example.org/vouchd/node/tpm/{OTHER_EK}")),
    ],
    ids=["label", "other-ek", "parent"],
)
def test_an_entry_bound_to_nodes_keeps_its_binding(bound: Entry) -> None:
    assert standalone_entries([bound], Selector("tpm", "ek_hash", LOCAL_EK)) == [bound]


def test_an_entry_that_names_no_node_is_bound_to_the_local_tpm() -> None:
    (bound,) = standalone_entries([entry("unbound")], Selector("tpm", "ek_hash", LOCAL_EK))

    assert bound.node_selectors == frozenset({Selector("tpm", "ek_hash", LOCAL_EK)})
    assert bound.parent is None


def test_on_a_host_without_a_tpm_an_entry_that_names_no_node_is_bound_to_the_node_key() -> None:
    key_hash = "ab" * 32
    (bound,) = standalone_entries([entry("unbound")], Selector("node", "key_hash", key_hash))

    assert bound.node_selectors == frozenset({Selector("node", "key_hash", key_hash)})
