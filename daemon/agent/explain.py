"""`vouchd explain`: why a process gets the identities it gets, or none, shown the way the agent decides.

For a running process the agent attests it with its own attestors (each one's selectors, evidence
and time, and the failure of any: the Workload API would refuse a caller whose attestation fails),
then matches the entries it holds: each entry that matched, and for the nearest misses the selectors
each lacks. For `--selectors` (a process that is not running) the matching alone. Nothing is issued
and nothing is handed out; the answer names no key, token or certificate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from vouchd.agent.admin import AdminCommandError
from vouchd.agent.lineage import held_by_ancestors
from vouchd.agent.matching import EntryVerdict
from vouchd.agent.policing import WorkloadPolicy
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import CallerContext
from vouchd.attestors.base import WorkloadAttestation, WorkloadAttestor, WorkloadProcess, attest_workload
from vouchd.attestors.errors import ProcessInfoError
from vouchd.attestors.workload.procfs import read_process_credentials, read_process_stat
from vouchd.entries import Entry
from vouchd.policy import PolicyDecision
from vouchd.selectors import InvalidSelectorError, Selector

__all__ = ["ALLOWED", "REFUSED", "WorkloadExplainer"]

ALLOWED = "allowed"
REFUSED = "refused"
_DEFAULT_NEAR_MISSES = 5
_MAX_NEAR_MISSES = 100
_MAX_SELECTORS = 1000


class WorkloadExplainer:
    """The admin command `workload.explain` of an agent."""

    def __init__(self, attestors: Sequence[WorkloadAttestor], svids: SvidManager, *, attest_deadline: float,
                 policy: WorkloadPolicy | None = None) -> None:
        self._attestors = list(attestors)
        self._svids = svids
        self._attest_deadline = attest_deadline
        self._policy = policy

    async def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        """`{"pid": N}` or `{"selectors": ["type:key:value", ...]}`, and optionally `"near_misses": N` and
        `"audiences": [...]` (the policy's verdict on a JWT-SVID for them rather than an X.509-SVID)."""
        unknown = sorted(set(args) - {"pid", "selectors", "near_misses", "audiences"})
        if unknown:
            raise AdminCommandError(f"unknown argument {', '.join(map(repr, unknown))[:200]}")
        near = args.get("near_misses", _DEFAULT_NEAR_MISSES)
        if isinstance(near, bool) or not isinstance(near, int) or not 0 <= near <= _MAX_NEAR_MISSES:
            raise AdminCommandError(f"near_misses must be a whole number from 0 to {_MAX_NEAR_MISSES}")
        if ("pid" in args) == ("selectors" in args):
            raise AdminCommandError("give either a pid or selectors")
        audiences = args.get("audiences", [])
        if not isinstance(audiences, list) or len(audiences) > 16 or \
                not all(isinstance(a, str) and 0 < len(a) <= 512 for a in audiences):
            raise AdminCommandError("audiences must be a list of at most 16 audiences of 1 to 512 characters")
        wanted = tuple(audiences)
        if "pid" in args:
            return await self._explain_process(args["pid"], near, wanted)
        selectors = _parse_selectors(args["selectors"])
        return self._verdict({"selectors": sorted(map(str, selectors)), "attestors": [], "evidence": []},
                             WorkloadAttestation(selectors), near, wanted)

    async def _explain_process(self, pid: object, near: int, audiences: tuple[str, ...]) -> dict[str, Any]:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise AdminCommandError("pid must be a positive whole number")
        process = _describe(pid)
        try:
            async with asyncio.timeout(self._attest_deadline):
                attestation = await attest_workload(process, self._attestors, fail_closed=False)
        except TimeoutError:
            raise AdminCommandError(f"attestation of pid {pid} took more than {self._attest_deadline:g}s "
                                    "(the Workload API would refuse it)") from None
        described: dict[str, Any] = {
            "pid": process.pid, "uid": process.uid, "gid": process.gid, "start_time": process.start_time,
            "selectors": sorted(map(str, attestation.selectors)),
            "attestors": [{"name": run.name, "ms": round(run.seconds * 1000, 3),
                           "selectors": [str(s) for s in run.selectors],
                           "evidence": [str(e) for e in run.evidence], "error": run.error}
                          for run in attestation.runs],
            "evidence": [str(e) for e in attestation.evidence],
        }
        return self._verdict(described, attestation, near, audiences)

    def _verdict(self, described: dict[str, Any], attestation: WorkloadAttestation, near: int,
                 audiences: tuple[str, ...]) -> dict[str, Any]:
        held = held_by_ancestors(attestation.evidence)
        verdicts = self._svids.matcher.verdicts(attestation.selectors, ancestors_hold=held)
        matched = [v for v in verdicts if v.matched]
        shown = matched + [v for v in verdicts if not v.matched][:near]
        refusals = {v.entry.id: refusal for v in matched if (refusal := self._svids.parents.cap(v.entry)[1])}
        judged = self._policy_verdicts(described, attestation, [v.entry for v in matched], audiences)
        for entry_id, judgement in judged.items():
            if not judgement.allowed and entry_id not in refusals:
                refusals[entry_id] = (f"denied by policy {', '.join(judgement.policy_ids) or '(none permits it)'}: "
                                      f"{'; '.join(judgement.reasons)}")
        entries = [_entry(v, refusals.get(v.entry.id), judged.get(v.entry.id)) for v in shown]
        granted = [v.entry for v in matched if v.entry.id not in refusals]
        failure = attestation.failure
        if failure is not None:
            outcome, reason = REFUSED, f"workload attestation failed: workloadattestor({failure.name}): {failure.error}"
        elif (banned := self._svids.banned) is not None:
            outcome, reason = REFUSED, f"node is banned: {banned}"
        elif not matched:
            outcome, reason = REFUSED, "no registration entry matches the caller's selectors"
            if any(v.held_by_ancestor for v in verdicts):
                reason += " (an entry that does is held by an ancestor: a child never gets its parent's identity)"
        elif not granted:
            outcome, reason = REFUSED, next(iter(refusals.values()))
        else:
            outcome = ALLOWED
            reason = "matched " + ", ".join(f"{e.id} ({e.spiffe_id})" for e in granted)
            if (held_back := self._svids.issuance_refusal()) is not None:
                reason += f"; only SVIDs already held can be served: {held_back}"
        return {**described, "entries": entries, "entries_total": len(verdicts), "outcome": outcome,
                "reason": reason, "spiffe_ids": [str(e.spiffe_id) for e in granted]}


    def _policy_verdicts(self, described: dict[str, Any], attestation: WorkloadAttestation,
                         entries: list[Entry], audiences: tuple[str, ...]) -> dict[str, PolicyDecision]:
        """What the policy says of handing each matched entry's X.509-SVID (or, given audiences, a
        JWT-SVID for them) to this caller now."""
        if self._policy is None or not entries:
            return {}
        process = WorkloadProcess(pid=described.get("pid", 1), uid=described.get("uid", _uid_of(attestation)),
                                  gid=described.get("gid", 0), start_time=described.get("start_time", 0))
        if audiences:
            caller = CallerContext("FetchJWTSVID", process, attestation.selectors, audiences=audiences,
                                   evidence=attestation.evidence)
            return {e.id: self._policy.jwt(caller, e, audiences, held=False) for e in entries}
        caller = CallerContext("FetchX509SVID", process, attestation.selectors, evidence=attestation.evidence)
        return {e.id: self._policy.x509(caller, e, held=self._svids.holds(e.id)) for e in entries}


def _uid_of(attestation: WorkloadAttestation) -> int:
    """The uid named by given selectors (`--selectors`), for the policy's principal; -1 when none is."""
    return next((int(s.value) for s in attestation.selectors if (s.type, s.key) == ("unix", "uid")), -1)


def _entry(verdict: EntryVerdict, refusal: str | None, policy: PolicyDecision | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"id": verdict.entry.id, "spiffe_id": str(verdict.entry.spiffe_id),
                             "matched": verdict.matched, "missing": [str(s) for s in verdict.missing]}
    if policy is not None:
        found["policy"] = {"allowed": policy.allowed, "policy_ids": list(policy.policy_ids),
                           "reasons": list(policy.reasons)}
    if verdict.held_by_ancestor:
        found["held_by_ancestor"] = True
    if refusal is not None:
        found["refusal"] = refusal
    return found


def _describe(pid: int) -> WorkloadProcess:
    """The process at `pid` as the Workload API would see it: its effective ids, as SO_PEERCRED reports them."""
    try:
        stat = read_process_stat(pid)
        credentials = read_process_credentials(pid)
    except ProcessInfoError as err:
        raise AdminCommandError(f"no process {pid} to explain: {err}") from None
    return WorkloadProcess(pid=pid, uid=credentials.effective_uid, gid=credentials.effective_gid,
                           start_time=stat.start_time)


def _parse_selectors(value: object) -> frozenset[Selector]:
    if not isinstance(value, list) or not value or len(value) > _MAX_SELECTORS:
        raise AdminCommandError(f"selectors must be a list of 1 to {_MAX_SELECTORS} type:key:value strings")
    try:
        return frozenset(Selector.parse(item) if isinstance(item, str) else _not_a_string(item) for item in value)
    except InvalidSelectorError as err:
        raise AdminCommandError(str(err)) from None


def _not_a_string(item: object) -> Selector:
    raise AdminCommandError(f"a selector must be a string, got {type(item).__name__}")
