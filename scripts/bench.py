"""Measure a standalone agent beside this machine's floor, in one run; print a table, write JSON.

    scripts/bench [--json FILE] [--quick] [--client auto|go|python] [--profile DIR]

What it measures (docs/performance.md says why each, and what dominates it):

- the floor: a minimal grpclib server (bench_floor.py) answering FetchX509SVID with a fixed answer the
  size of the agent's, driven by the same client code, right before each measurement of the agent;
- FetchX509SVID calls per second and latency at 1, 16 and 64 concurrent callers, one connection per
  caller, then a new connection per call; the agent's CPU per call; the ratio to the floor;
- a new workload's first SVID: fresh processes of distinct identities, issued, then already cached;
- boot to ready (a fresh agent, the swtpm provisioned) and restart to the first SVID;
- entry create -> the first SVID of a caller waiting for it; revocation -> open streams updated;
- FetchJWTSVID latency; a policy decision; matching one caller against 10,000 entries (in-process);
- the agent's RSS idle, with 1000 open streams (and how long they took to open), after they closed;
- one `vouchd server` replica over MQTT: node attestations and JWT-SVID issuances a second (bench_fleet.py).

A figure that could not be measured is null in the JSON and "n/a" in the table, with the reason under
"errors". Every Workload API call comes from a client process, none from the bench: go-spiffe through
bench/goload when Go >= 1.24 builds it (as SPIRE's agent was measured), else bench_clients.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_measure as measure
import bench_profile
from bench_agent import (
    BenchAgent,
    BenchError,
    LoadClient,
    bench_agent,
    build_go_client,
    floor_server,
    machine,
    rss_mb,
)
from bench_fleet import measure_fleet
from bench_inprocess import measure_matching, measure_policy
from bench_report import summary, table, verdicts

T = TypeVar("T")

CONCURRENCY = (1, 16, 64)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "errors": {}}

    def attempt(name: str, measurement: Callable[[], T]) -> T | None:
        """A measurement that fails leaves its figures null and says why, and the run goes on."""
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            value = measurement()
        except (BenchError, OSError, TimeoutError, KeyError, ValueError, subprocess.SubprocessError) as err:
            results["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"bench: {name} failed: {err}", file=sys.stderr)
            return None
        print(f"bench: {name} done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        return value

    results["matching"] = attempt("matching", lambda: measure_matching(args.match_entries, args.match_calls))
    results["policy_decision"] = attempt("policy", lambda: measure_policy(args.policy_requests))
    with bench_agent(args.keep) as agent:
        results["boot_to_ready_s"] = agent.start()
        time.sleep(1.0)  # what start-up leaves behind settles before the idle RSS is read
        results["rss_idle_mb"] = rss_mb(agent.pid)
        measure_with_agent(agent, args, results, attempt)
        results["agent_log_tail"] = agent.log_tail(20) if results["errors"] else []
    # One vouchd server replica over MQTT (bench_fleet.py): attestations and issuances a second.
    results["fleet"] = attempt("fleet", lambda: measure_fleet(50 if args.quick else 200, args.seconds))
    results.update(summary(results))
    results["verdicts"] = verdicts(results)
    return results


def load_client(choice: str, folder: Path, results: dict[str, Any]) -> LoadClient:
    if choice == "python":
        return LoadClient(None)
    binary, said = build_go_client(folder)
    if binary is None:
        if choice == "go":
            raise SystemExit(f"bench: --client go: {said}")
        print(f"bench: the load client is Python's grpclib: {said}", file=sys.stderr)
        results["go_client_unavailable"] = said
    return LoadClient(binary)


def measure_with_agent(agent: BenchAgent, args: argparse.Namespace, results: dict[str, Any],
                       attempt: Callable[[str, Callable[[], Any]], Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="vouchd-bench-") as scratch:
        Path(scratch).chmod(0o755)  # the new workloads run the Go client as their own uids
        clients = load_client(args.client, Path(scratch), results)
        results["load_client"] = clients.name
        response = Path(scratch) / "x509-response.bin"
        results["x509_response"] = attempt("one fetch", lambda: measure.fetch_response(agent, response))
        if results["x509_response"] is None:
            return
        with floor_server(response) as floor:
            results["fetch_x509"] = attempt("FetchX509SVID throughput", lambda: measure.throughput(
                clients, agent, floor, args.concurrency, seconds=args.seconds))
            results["fetch_jwt_svid"] = attempt("FetchJWTSVID", lambda: measure.jwt_fetch(
                clients, agent, args.seconds))
            results["new_workload"] = attempt("new workloads", lambda: asyncio.run(
                measure.new_workloads(clients, agent, args.rounds, args.fresh_uid_base, floor[0])))
            results["entry_create_to_waiting_caller"] = attempt("entry create -> first SVID", lambda: asyncio.run(
                measure.entry_to_svid(agent, args.rounds, args.waiting_uid_base)))
            results["revocation_to_open_stream"] = attempt("revocation", lambda: asyncio.run(
                measure.revocation(agent, args.revocation_streams, args.rounds)))
            results["streams"] = attempt(f"{args.streams} open streams", lambda: asyncio.run(
                measure.open_streams(clients, agent, args.streams, floor[0])))
        if args.profile is not None:
            profile_dir: Path = args.profile
            results["profile"] = attempt("profile", lambda: bench_profile.profile(
                clients, agent, max(args.seconds, 5.0), profile_dir))

    def restart() -> float:
        agent.stop()
        return agent.start()

    results["restart_to_first_svid_s"] = attempt("restart", restart)
    try:
        results["tpm_latency_ms"] = agent.running.status().get("tpm_latency_ms")
    except (OSError, ValueError) as err:
        results["errors"]["status"] = str(err)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results to this file (else to stdout)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs and fewer rounds (1.5 s per load, 10 rounds): a smoke run, noisier")
    parser.add_argument("--seconds", type=float, help="seconds per load measurement (5; 1.5 with --quick)")
    parser.add_argument("--rounds", type=positive,
                        help="new workloads, waiting callers and revocations, each (50; 10 with --quick)")
    parser.add_argument("--concurrency", type=positive, nargs="+", default=list(CONCURRENCY),
                        help="concurrent callers of the load measurements")
    parser.add_argument("--streams", type=positive, default=1000, help="streams opened at once for the RSS figures")
    parser.add_argument("--revocation-streams", type=positive, default=10,
                        help="streams open while entries are created and deleted")
    parser.add_argument("--fresh-uid-base", type=positive, default=30000, help="uid of the first new workload")
    parser.add_argument("--waiting-uid-base", type=positive, default=20000, help="uid of the first waiting caller")
    parser.add_argument("--match-entries", type=positive, default=10_000, help="entries a caller is matched against")
    parser.add_argument("--match-calls", type=positive, default=5000, help="callers matched")
    parser.add_argument("--policy-requests", type=positive, default=5000, help="different policy requests decided")
    parser.add_argument("--profile", type=Path,
                        help="then record the agent with py-spy under FetchX509SVID load at c=16 into this folder "
                             "(extra runs, not the measured ones; see bench_profile.py)")
    parser.add_argument("--client", choices=("auto", "go", "python"), default="auto",
                        help="what makes the load calls: go-spiffe (bench/goload, needs Go >= 1.24; auto: when it "
                             "builds) or Python's grpclib")
    parser.add_argument("--keep", action="store_true", help="keep the agent's folder (log, swtpm state)")
    args = parser.parse_args()
    args.seconds = args.seconds or (1.5 if args.quick else 5.0)
    args.rounds = args.rounds or (10 if args.quick else 50)
    if args.quick:
        args.match_calls, args.policy_requests = min(args.match_calls, 1000), min(args.policy_requests, 1000)
    if os.geteuid() != 0:
        parser.error("run as root: the agent's entry is for uid 0, and the new workloads become other uids")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C: the clients, the agent and its swtpm are stopped, the folders removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = run(args)
    print(table(results), file=sys.stderr if args.json is None else sys.stdout)
    document = json.dumps(results, indent=2)
    if args.json is None:
        print(document)
    else:
        args.json.write_text(document + "\n")
        print(f"bench: wrote {args.json}", file=sys.stderr)
    if results["errors"]:
        print(f"bench: {len(results['errors'])} measurement(s) failed: {', '.join(results['errors'])}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
