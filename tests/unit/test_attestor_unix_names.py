"""The unix attestor's names of ids: looked up on a thread, then used again for NAME_TTL seconds only."""

from __future__ import annotations

from vouchd.attestors.workload.unix import NAME_TTL, _Names, _ProcessFacts

FACTS = _ProcessFacts(user="alice", group="staff", supplementary_groups=((27, "sudo"), (999, None)))


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_names_are_used_again_for_their_time_to_live_only() -> None:
    clock = Clock()
    names = _Names(clock=clock)
    assert names.facts(1000, 50, (27, 999)) is None, "nothing looked up yet"

    names.remember(1000, 50, FACTS)
    clock.now += NAME_TTL - 0.01
    assert names.facts(1000, 50, (27, 999)) == FACTS, "a group without a name stays without one"
    clock.now += 0.01
    assert names.facts(1000, 50, (27, 999)) is None


def test_a_group_not_looked_up_means_looking_up_again() -> None:
    names = _Names(clock=Clock())
    names.remember(1000, 50, FACTS)

    assert names.facts(1000, 50, (27, 4)) is None
    assert names.facts(1001, 50, (27,)) is None


def test_the_oldest_names_are_forgotten_first() -> None:
    names = _Names(capacity=4, clock=Clock())
    names.remember(1000, 50, FACTS)  # user 1000, groups 50, 27, 999
    names.remember(2000, 60, _ProcessFacts(user="bob", group="bob", supplementary_groups=()))

    assert names.facts(2000, 60, ()) is not None
    assert names.facts(1000, 50, (27, 999)) is None, "user 1000 and group 50 were forgotten"
