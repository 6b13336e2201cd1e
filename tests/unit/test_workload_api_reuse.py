"""Reusing a caller's attestation (workload_api/reuse.py) and the fingerprint it rests on
(attestors/workload/fingerprint.py), against real processes: a child that can exec on request."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vouchd.agent.workload_api.reuse import AttestationReuse
from vouchd.attestors.base import AttestorRun, WorkloadAttestation, WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessExitedError
from vouchd.attestors.workload.executable import CANNOT_TELL, inspect_executable, inspect_executable_inline
from vouchd.attestors.workload.fingerprint import AncestorWatch, effective_ids, read_process_traits
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.procfs import Mount, read_process_stat
from vouchd.selectors import Selector

BUILT_IN = ("unix", "interpreter", "systemd", "container", "lineage")
# Waits for a line on stdin, then becomes /bin/sleep: the same pid and start time, another program.
EXEC_ON_REQUEST = "import os, sys; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '60'])"


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", EXEC_ON_REQUEST], stdin=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def workload(process: subprocess.Popen[str]) -> WorkloadProcess:
    return WorkloadProcess(pid=process.pid, uid=os.geteuid(), gid=os.getegid(),
                           start_time=read_process_stat(process.pid).start_time)


def attestation(*names: str) -> WorkloadAttestation:
    return WorkloadAttestation(selectors=frozenset({Selector("unix", "uid", "0")}),
                               runs=tuple(AttestorRun(name, 0.001) for name in names))


class CountingAttestor:
    """What the service's full attestation stands for: counts its calls, answers what it is given."""

    def __init__(self, answer: WorkloadAttestation | Exception, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> WorkloadAttestation:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def exec_sleep(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{process.pid}/exe") != os.path.realpath("/bin/sleep"):
        assert time.monotonic() < deadline, "the child did not exec"
        time.sleep(0.01)


# -- the fingerprint ------------------------------------------------------------------------------------


def test_traits_name_the_process_and_its_ancestors_up_from_the_parent(child: subprocess.Popen[str]) -> None:
    traits = read_process_traits(child.pid)

    assert traits.start_time == read_process_stat(child.pid).start_time
    assert traits.ancestors[0] == (os.getpid(), read_process_stat(os.getpid()).start_time)
    assert effective_ids(traits) == (os.geteuid(), os.getegid())
    assert [line.split(b":")[0] for line in traits.ids.splitlines()] == [b"Uid", b"Gid", b"Groups"]


def test_traits_of_a_process_that_is_gone_say_so() -> None:
    process = subprocess.Popen(["true"])
    process.wait()

    with pytest.raises(ProcessExitedError):
        read_process_traits(process.pid)


def test_the_executable_read_inline_is_the_one_the_unix_attestor_reads(child: subprocess.Popen[str]) -> None:
    mounts = MountTables()

    inline = inspect_executable_inline(child.pid, mounts)

    if inline is CANNOT_TELL:
        pytest.skip("this host's python lives on a file system outside LOCAL_FILE_SYSTEMS")
    assert inline == inspect_executable(child.pid, mounts=mounts)


class _KeptTable(MountTables):
    """A kept host table that lists every mount as `fs_type` (or lists none)."""

    def __init__(self, fs_type: str | None) -> None:
        super().__init__(keep_host_table=False)
        self._fs_type = fs_type

    def kept_mount(self, mount_id: int) -> Mount | None:
        return None if self._fs_type is None else Mount(mount_id, (0, 0), "/", self._fs_type, "")


@pytest.mark.parametrize("fs_type", ["overlay", "fuse.sshfs", "nfs4", None])
def test_an_executable_outside_local_file_systems_is_not_stated_inline(child: subprocess.Popen[str],
                                                                       fs_type: str | None) -> None:
    # An overlay can be stacked on FUSE: stat'ing it may wait, so a thread must.
    assert inspect_executable_inline(child.pid, _KeptTable(fs_type)) is CANNOT_TELL


def test_an_exec_changes_the_fingerprint(child: subprocess.Popen[str]) -> None:
    reuse = AttestationReuse()
    process = workload(child)
    before = reuse.fingerprint(process)

    exec_sleep(child)

    after = reuse.fingerprint(process)
    assert before is not None and after is not None
    assert before.traits.start_time == after.traits.start_time, "an exec keeps the pid and the start time"
    assert before.executable != after.executable


def test_no_fingerprint_for_another_process_at_the_pid(child: subprocess.Popen[str]) -> None:
    process = workload(child)
    reused_pid = WorkloadProcess(pid=process.pid, uid=process.uid, gid=process.gid,
                                 start_time=process.start_time + 1)

    assert AttestationReuse().fingerprint(reused_pid) is None


# -- reuse ------------------------------------------------------------------------------------------------


def test_a_second_request_of_the_same_process_reuses_its_attestation(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)

    first = asyncio.run(reuse.attest(process, attest))
    second = asyncio.run(reuse.attest(process, attest))

    assert (first[1], second[1]) == (False, True)
    assert second[0] is first[0]
    assert attest.calls == 1


def test_an_exec_is_attested_again(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)
    asyncio.run(reuse.attest(process, attest))

    exec_sleep(child)
    _, reused = asyncio.run(reuse.attest(process, attest))

    assert not reused
    assert attest.calls == 2


def test_an_attestation_is_reused_for_the_window_only(child: subprocess.Popen[str]) -> None:
    clock = Clock()
    reuse, attest = AttestationReuse(window=2.0, clock=clock), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)
    asyncio.run(reuse.attest(process, attest))

    clock.now += 1.9
    assert asyncio.run(reuse.attest(process, attest))[1]
    clock.now += 0.1
    assert not asyncio.run(reuse.attest(process, attest))[1]
    assert attest.calls == 2


def test_an_ancestor_handed_an_identity_means_attesting_again(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)
    asyncio.run(reuse.attest(process, attest))
    parent = WorkloadProcess(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid(),
                             start_time=read_process_stat(os.getpid()).start_time)

    reuse.handed(parent, ["spiffe://example.org/parent"])
    assert not asyncio.run(reuse.attest(process, attest))[1], "its lineage selectors may have changed"
    reuse.handed(parent, ["spiffe://example.org/parent"])  # nothing new: nothing changes
    assert asyncio.run(reuse.attest(process, attest))[1]


def test_a_stranger_handed_an_identity_changes_nothing(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)
    asyncio.run(reuse.attest(process, attest))

    with subprocess.Popen(["sleep", "60"]) as sibling:
        try:
            reuse.handed(WorkloadProcess(pid=sibling.pid, uid=0, gid=0,
                                         start_time=read_process_stat(sibling.pid).start_time),
                         ["spiffe://example.org/sibling"])
        finally:
            sibling.kill()

    assert asyncio.run(reuse.attest(process, attest))[1]


def test_a_forgotten_holder_means_attesting_again(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(holder_capacity=1), CountingAttestor(attestation(*BUILT_IN))
    process = workload(child)
    asyncio.run(reuse.attest(process, attest))

    for pid in (11, 12):  # the second forgets the first, which could have been an ancestor
        reuse.handed(WorkloadProcess(pid=pid, uid=0, gid=0, start_time=1), ["spiffe://example.org/x"])

    assert not asyncio.run(reuse.attest(process, attest))[1]


def test_nothing_is_reused_with_an_attestor_that_is_not_built_in(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN, "acme"))
    process = workload(child)

    for _ in range(3):
        assert not asyncio.run(reuse.attest(process, attest))[1]
    assert attest.calls == 3
    assert reuse.reads_traits is None, "nothing to read traits for"


def test_a_failed_attestation_is_never_kept(child: subprocess.Popen[str]) -> None:
    reuse = AttestationReuse()
    process = workload(child)
    failing = CountingAttestor(AttestorError("unix", "no"))

    for _ in range(2):
        with pytest.raises(AttestorError):
            asyncio.run(reuse.attest(process, failing))

    assert failing.calls == 2


def test_requests_arriving_together_share_one_attestation(child: subprocess.Popen[str]) -> None:
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN), delay=0.05)
    process = workload(child)

    async def together() -> list[tuple[WorkloadAttestation, bool]]:
        return await asyncio.gather(*(reuse.attest(process, attest) for _ in range(10)))

    answers = asyncio.run(together())

    assert attest.calls == 1
    assert sum(reused for _, reused in answers) == 9
    assert len({id(found) for found, _ in answers}) == 1


def test_a_process_whose_traits_cannot_be_read_is_attested_in_full() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    reuse, attest = AttestationReuse(), CountingAttestor(attestation(*BUILT_IN))
    gone = WorkloadProcess(pid=process.pid, uid=0, gid=0, start_time=1)

    for _ in range(2):
        assert not asyncio.run(reuse.attest(gone, attest))[1]
    assert attest.calls == 2


# -- the chain of ancestors, watched -------------------------------------------------------------------------

# A child that starts a grandchild (sleep) and says its pid, then waits for a line before exiting.
PARENT_OF_SLEEP = ("import subprocess, sys; child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True); "
                   "sys.stdin.readline()")


def test_a_watched_chain_stands_until_one_of_its_members_exits() -> None:
    middle = subprocess.Popen([sys.executable, "-c", PARENT_OF_SLEEP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert middle.stdout is not None and middle.stdin is not None
    grandchild = int(middle.stdout.readline())
    watch = AncestorWatch()
    try:
        walked = read_process_traits(grandchild, watch=watch)
        assert walked.ancestors[:2] == ((middle.pid, read_process_stat(middle.pid).start_time),
                                        (os.getpid(), read_process_stat(os.getpid()).start_time))
        assert watch.standing(middle.pid, walked.start_time) == walked.ancestors
        assert read_process_traits(grandchild, watch=watch) == walked

        middle.stdin.write("\n")  # the middle process exits: the grandchild is re-parented
        middle.stdin.flush()
        middle.wait()
        assert watch.standing(middle.pid, walked.start_time) is None
        again = read_process_traits(grandchild, watch=watch)
        assert again.ancestors[0][0] != middle.pid
        assert all(pid != middle.pid for pid, _ in again.ancestors)
    finally:
        watch.close()
        os.kill(grandchild, 9)
        middle.kill()
        middle.wait()


def test_a_chain_with_a_forgotten_member_is_walked_again(child: subprocess.Popen[str]) -> None:
    watch = AncestorWatch(capacity=1)
    try:
        walked = read_process_traits(child.pid, watch=watch)
        assert len(walked.ancestors) > 1, "the test's own process has a parent"
        assert watch.standing(os.getpid(), walked.start_time) is None, "only one of its pidfds is kept"
        assert read_process_traits(child.pid, watch=watch) == walked
    finally:
        watch.close()


def test_a_chain_deeper_than_is_walked_is_not_known_whole(child: subprocess.Popen[str]) -> None:
    shallow = read_process_traits(child.pid, max_ancestors=1)

    assert shallow.ancestors[-1][1] == -1, "more above the parent: not known whole"
    assert read_process_traits(child.pid).ancestors[-1][1] >= 0


# Waits for a line on stdin, then runs the same interpreter again with another program: the same pid,
# start time and executable; only the command line, and where it all lies in memory, are new.
SAME_INTERPRETER = ("import os, sys; sys.stdin.readline(); "
                    "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # another'])")


def test_an_exec_of_the_same_interpreter_with_another_script_changes_the_fingerprint() -> None:
    process = subprocess.Popen([sys.executable, "-c", SAME_INTERPRETER], stdin=subprocess.PIPE, text=True)
    try:
        reuse = AttestationReuse()
        before = reuse.fingerprint(workload(process))
        first_cmdline = open(f"/proc/{process.pid}/cmdline", "rb").read()  # noqa: SIM115
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        deadline = time.monotonic() + 10
        while open(f"/proc/{process.pid}/cmdline", "rb").read() == first_cmdline:  # noqa: SIM115
            assert time.monotonic() < deadline, "the child did not exec"
            time.sleep(0.01)

        after = reuse.fingerprint(workload(process))

        assert before is not None and after is not None
        assert before.executable == after.executable, "the same interpreter binary"
        assert before.traits.exec_layout != after.traits.exec_layout
        assert before != after, "so its attestation (its script selectors) is not reused"
    finally:
        process.kill()
        process.wait()
