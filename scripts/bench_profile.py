"""`scripts/bench --profile DIR`: where the agent's time goes while it answers FetchX509SVID.

After the measurements, py-spy (in the venv: `pip install py-spy`) records the agent during one more
load run at 16 callers, one connection each, then one with a new connection per call. py-spy pauses the
process at each sample (its accurate mode): these runs are slower, and are not the measured ones. Each
recording is written as collapsed stacks (DIR/agent-c16-*.txt, for flame graph tools) with a summary
beside it (DIR/agent-c16-*.summary.txt): the share of samples in each function, itself and below it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench_agent import DEADLINE, BenchAgent, BenchError, LoadClient, run_json

_LINE_NUMBER = re.compile(r":\d+\)$")
_OUTER = ("(<frozen runpy>)", "(daemon/cli.py)", "(asyncio/runners.py)", "(asyncio/base_events.py)",
          "(asyncio/events.py)")


def py_spy() -> Path:
    path = Path(sys.executable).with_name("py-spy")
    if not path.exists():
        raise BenchError(f"no {path}: pip install py-spy into the venv for --profile")
    return path


def profile(clients: LoadClient, agent: BenchAgent, seconds: float, folder: Path) -> dict[str, str]:
    """Record the agent under load, kept connections then a new one per call; the files written."""
    written = {}
    for per_call in (False, True):
        name = f"agent-c16-{'new-connection' if per_call else 'kept-connection'}"
        raw = folder / f"{name}.txt"
        spy = subprocess.Popen([str(py_spy()), "record", "-p", str(agent.pid), "-d", str(int(seconds) + 1),
                                "-r", "250", "-f", "raw", "-t", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            run_json(clients.argv("load", agent.socket, concurrency=16, seconds=seconds, per_call=per_call),
                     timeout=DEADLINE * 2 + seconds)
        finally:
            _, stderr = spy.communicate(timeout=DEADLINE)
        if spy.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed ({spy.returncode}): {stderr.strip()[-300:]}")
        summary = folder / f"{name}.summary.txt"
        summary.write_text(summarise(raw))
        written[name] = str(summary)
    return written


def summarise(raw: Path, top: int = 45) -> str:
    """The functions with the most samples of the event loop's thread (MainThread), below them (inclusive)
    and in them (self), as percentages of that thread's samples; the other threads' share apart. (A pool
    thread waiting for work is sampled as if it ran: its samples are not the agent's CPU.)"""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        thread, *frames = stack.split(";")
        name = thread.rpartition(": ")[2].rstrip(")") if ": " in thread else thread
        threads[name] += samples
        if name != "MainThread":
            continue
        frames = [_LINE_NUMBER.sub(")", frame) for frame in frames]
        for frame in set(frames):
            if not frame.endswith(_OUTER):  # the loop and what started it: in every sample
                inclusive[frame] += samples
        if frames:
            own[frames[-1]] += samples
    main = threads["MainThread"]
    lines = [f"{raw.name}: {sum(threads.values())} samples; by thread: "
             + ", ".join(f"{name} {n}" for name, n in threads.most_common())]
    for title, counts in (("MainThread, inclusive (the function and what it calls)", inclusive),
                          ("MainThread, self", own)):
        lines += ["", title]
        lines += [f"{100 * n / max(1, main):5.1f}%  {frame}" for frame, n in counts.most_common(top)]
    return "\n".join(lines) + "\n"
