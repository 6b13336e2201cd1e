"""The unix attestor against real processes: credentials, executable path and hash, cache, hashing budget."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.processes import described, unix_values
from vouchd.attestors import AttestorError, WorkloadProcess
from vouchd.attestors.workload.unix import (
    MIN_HASH_COST,
    SELECTOR_KINDS,
    ExecutableFile,
    ExecutableHasher,
    HashBudget,
    HashRefusal,
    UnixAttestor,
    inspect_executable,
)
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorSchema

SLEEP = Path(shutil.which("sleep") or "/bin/sleep").resolve()
MIB = 1024 * 1024


class CountingHasher(ExecutableHasher):
    """Counts how often file content is actually read, and in which threads."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reads = 0
        self.threads: list[str] = []

    def digest_file(self, fd: int) -> str:
        self.reads += 1
        self.threads.append(threading.current_thread().name)
        return super().digest_file(fd)


class HeldHasher(CountingHasher):
    """Reads only once the test lets it: `reading` is set while a read waits for `release`."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.reading = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def digest_file(self, fd: int) -> str:
        self.reading.set()
        if not self.release.wait(timeout=10):
            raise AssertionError("the test never released the read")
        return super().digest_file(fd)


class FakeClock:
    """Time that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def budget(clock: FakeClock, *, per_second: int, burst: int, uid_share: float = 1.0) -> HashBudget:
    return HashBudget(bytes_per_second=per_second, burst_bytes=burst, uid_share=uid_share, clock=clock.time)


Spawn = Callable[[Path], WorkloadProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `binary 60` (a sleep) and describe it as the Workload API would."""
    children: list[subprocess.Popen[bytes]] = []

    def start(binary: Path) -> WorkloadProcess:
        child = subprocess.Popen([str(binary), "60"])
        children.append(child)
        return described(child)

    yield start
    for child in children:
        child.kill()
        child.wait()


def copy_of_sleep(directory: Path, name: str = "my-sleep") -> Path:
    target = directory / name
    shutil.copy2(SLEEP, target)
    target.chmod(0o755)
    return target


def executable_of(process: WorkloadProcess) -> ExecutableFile:
    executable = inspect_executable(process.pid)
    assert executable is not None
    return executable


async def read_started(hasher: HeldHasher) -> bool:
    # Waits in a thread of its own: the default pool may be what a test keeps small.
    loop = asyncio.get_running_loop()
    started: asyncio.Future[bool] = loop.create_future()

    def wait() -> None:
        loop.call_soon_threadsafe(started.set_result, hasher.reading.wait(10))

    threading.Thread(target=wait, daemon=True).start()
    return await started


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def not_hashed_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vouchd.attestors.unix" and r.getMessage().startswith("not hashing")]


# -- selectors ---------------------------------------------------------------------------------------------------


async def test_selectors_describe_the_process(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    process = spawn(binary)

    selectors = await UnixAttestor().attest(process)

    assert unix_values(selectors, "uid") == [str(os.getuid())]
    assert unix_values(selectors, "user") == [pwd.getpwuid(os.getuid()).pw_name]
    assert unix_values(selectors, "gid") == [str(os.getgid())]
    assert unix_values(selectors, "group") == [grp.getgrgid(os.getgid()).gr_name]
    assert sorted(unix_values(selectors, "supplementary_gid")) == sorted(str(g) for g in os.getgroups())
    assert unix_values(selectors, "path") == [str(binary)]
    assert unix_values(selectors, "sha256") == [sha256_of(binary)]


async def test_uid_and_gid_come_from_the_kernel_credentials_not_from_proc(spawn: Spawn) -> None:
    process = spawn(SLEEP)
    as_reported = WorkloadProcess(pid=process.pid, uid=4242, gid=4343, start_time=process.start_time)

    selectors = await UnixAttestor(hash_executables=False).attest(as_reported)

    assert unix_values(selectors, "uid") == ["4242"]
    assert unix_values(selectors, "gid") == ["4343"]


async def test_a_deleted_executable_gives_no_path_and_no_hash(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    process = spawn(binary)
    binary.unlink()

    selectors = await UnixAttestor().attest(process)

    assert unix_values(selectors, "path") == []
    assert unix_values(selectors, "sha256") == []
    assert unix_values(selectors, "uid") == [str(os.getuid())]


async def test_an_exited_process_is_an_attestor_error() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    gone = WorkloadProcess(pid=child.pid, uid=0, gid=0, start_time=1)

    with pytest.raises(AttestorError, match=rf"^workloadattestor\(unix\): process {child.pid} has exited$"):
        await UnixAttestor().attest(gone)


# -- what the attestor declares it produces ---------------------------------------------------------------------

UNIX_SCHEMA = SelectorSchema({"unix": UnixAttestor.produces}, described_as="a unix selector")
DECIMAL_ID = "a decimal number (no sign, spaces or leading zeros) below 4294967295"


def test_the_declaration_lists_every_key_attest_emits() -> None:
    assert UnixAttestor.produces is SELECTOR_KINDS
    assert [(kind.type, kind.key) for kind in SELECTOR_KINDS] == [
        ("unix", key) for key in
        ("uid", "user", "gid", "group", "supplementary_gid", "supplementary_group", "path", "sha256")
    ]


async def test_what_attest_emits_passes_its_own_declaration(spawn: Spawn, tmp_path: Path) -> None:
    process = spawn(copy_of_sleep(tmp_path, "my sleep (v2)"))

    selectors = await UnixAttestor().attest(process)

    assert {s.key for s in selectors} >= {"uid", "gid", "path", "sha256"}
    assert [(str(s), UNIX_SCHEMA.problem(s)) for s in selectors] == [(str(s), None) for s in selectors]


@pytest.mark.parametrize(
    "text",
    ["unix:uid:0", "unix:uid:4294967294", "unix:gid:65534", "unix:supplementary_gid:27", "unix:user:www-data",
     "unix:user:AD\\domain user", "unix:group:domain users", "unix:supplementary_group:docker",
     "unix:path:/usr/bin/python3.12", "unix:path:/opt/my app/bin/run (v2)", "unix:sha256:" + "0f" * 32],
)
def test_values_the_attestor_can_emit_are_accepted(text: str) -> None:
    assert UNIX_SCHEMA.problem(Selector.parse(text)) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("unix:uid:abc", f"a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        ("unix:uid:-1", f"a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        ("unix:uid: 0", f"a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        ("unix:uid:01000", f"a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        ("unix:uid:4294967295", f"a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        ("unix:gid:root", f"a gid is {DECIMAL_ID}, e.g. unix:gid:1000"),
        ("unix:supplementary_gid:1e3", f"a supplementary_gid is {DECIMAL_ID}, e.g. unix:supplementary_gid:1000"),
        ("unix:user:", "a user is a name without spaces at either end, e.g. unix:user:www-data"),
        ("unix:user: root", "a user is a name without spaces at either end, e.g. unix:user:www-data"),
        ("unix:group:wheel ", "a group is a name without spaces at either end, e.g. unix:group:www-data"),
        ("unix:supplementary_group:",
         "a supplementary_group is a name without spaces at either end, e.g. unix:supplementary_group:docker"),
        ("unix:path:python3", "a path is absolute and normalised, as the kernel reports it, "
                              "e.g. unix:path:/usr/bin/python3.12"),
        ("unix:path:/usr/bin/../bin/python3", "a path is absolute and normalised, as the kernel reports it, "
                                              "e.g. unix:path:/usr/bin/python3.12"),
        ("unix:sha256:XYZ", "a sha256 is 64 lowercase hex digits, as sha256sum prints it"),
        ("unix:sha256:" + "0F" * 32, "a sha256 is 64 lowercase hex digits, as sha256sum prints it"),
        ("unix:sha256:" + "0f" * 31, "a sha256 is 64 lowercase hex digits, as sha256sum prints it"),
    ],
)
def test_values_the_attestor_never_emits_are_named(text: str, problem: str) -> None:
    assert UNIX_SCHEMA.problem(Selector.parse(text)) == f"{text}: {problem}"


# -- the hash cache and shared reads -----------------------------------------------------------------------------


async def test_a_cache_hit_does_not_read_the_file_again(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)

    first = await attestor.attest(spawn(binary))
    second = await attestor.attest(spawn(binary))  # another process, same file

    assert hasher.reads == 1
    assert unix_values(first, "sha256") == unix_values(second, "sha256") == [sha256_of(binary)]


async def test_a_different_file_is_hashed_again(spawn: Spawn, tmp_path: Path) -> None:
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)

    await attestor.attest(spawn(copy_of_sleep(tmp_path, "one")))
    await attestor.attest(spawn(copy_of_sleep(tmp_path, "two")))  # same bytes, new inode

    assert hasher.reads == 2


async def test_concurrent_attestations_of_one_file_hash_it_once(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)
    processes = [spawn(binary) for _ in range(4)]

    results = await asyncio.gather(*(attestor.attest(p) for p in processes))

    assert hasher.reads == 1
    assert all(unix_values(r, "sha256") == [sha256_of(binary)] for r in results)


async def test_a_caller_whose_process_exits_before_the_shared_read_fails_nobody(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = HeldHasher()
    staying = spawn(binary)
    executable = executable_of(staying)
    leaving = subprocess.Popen([str(binary), "60"])
    try:
        hasher.release.clear()
        first = asyncio.create_task(hasher.sha256(described(leaving), executable))
        assert await read_started(hasher)  # the shared read is started, nothing is read yet...
        second = asyncio.create_task(hasher.sha256(staying, executable))
    finally:
        leaving.kill()  # ...when the process of the caller that started it exits
        leaving.wait()

    hasher.release.set()

    assert await second == sha256_of(binary)
    assert await first == sha256_of(binary)  # the file it ran; the Workload API's re-check refuses the caller
    assert hasher.reads == 1, "both callers share one read"


async def test_a_caller_that_gives_up_does_not_take_the_shared_read_with_it(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = HeldHasher()
    leader, follower = spawn(binary), spawn(binary)
    executable = executable_of(leader)
    hasher.release.clear()
    first = asyncio.create_task(hasher.sha256(leader, executable))
    assert await read_started(hasher)
    second = asyncio.create_task(hasher.sha256(follower, executable))

    first.cancel()  # the first caller's deadline passed: its own descriptor is closed
    with pytest.raises(asyncio.CancelledError):
        await first
    hasher.release.set()

    assert await second == sha256_of(binary)
    assert hasher.reads == 1


async def test_a_caller_running_another_file_does_not_share_its_read(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = HeldHasher()
    leader = spawn(binary)
    executable = executable_of(leader)
    impostor = spawn(copy_of_sleep(tmp_path, "other"))
    hasher.release.clear()
    first = asyncio.create_task(hasher.sha256(leader, executable))
    assert await read_started(hasher)

    try:
        with pytest.raises(AttestorError, match=rf"process {impostor.pid} replaced its executable during attestation"):
            await hasher.sha256(impostor, executable)
    finally:
        hasher.release.set()
    assert await first == sha256_of(binary)


async def test_files_above_the_size_limit_are_not_hashed(spawn: Spawn, caplog: pytest.LogCaptureFixture) -> None:
    limit = SLEEP.stat().st_size - 1
    hasher = CountingHasher(max_bytes=limit)
    process = spawn(SLEEP)

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        selectors = await UnixAttestor(hasher=hasher).attest(process)

    assert unix_values(selectors, "sha256") == []
    assert unix_values(selectors, "path") == [str(SLEEP)]
    assert hasher.reads == 0
    (warning,) = not_hashed_warnings(caplog)
    assert warning.getMessage() == (
        f"not hashing {SLEEP}, the executable of pid {process.pid} uid {process.uid}: "
        f"{limit + 1} bytes is above the {limit} limit; omitting sha256"
    )


async def test_hashing_can_be_switched_off(spawn: Spawn) -> None:
    hasher = CountingHasher()

    selectors = await UnixAttestor(hash_executables=False, hasher=hasher).attest(spawn(SLEEP))

    assert unix_values(selectors, "sha256") == []
    assert unix_values(selectors, "path") == [str(SLEEP)]
    assert hasher.reads == 0


# -- the hashing budget: bytes, per uid, never waited for ---------------------------------------------------------


async def test_a_hash_beyond_the_budget_is_left_out_without_waiting(
    spawn: Spawn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()  # never moves by itself: waiting for a refill would never end
    hasher = CountingHasher(max_bytes=2 * MIB, budget=budget(clock, per_second=MIB, burst=2 * MIB))
    attestor = UnixAttestor(hasher=hasher)
    for name in ("one", "two"):  # each small file costs MIN_HASH_COST: the burst holds two
        assert unix_values(await attestor.attest(spawn(copy_of_sleep(tmp_path, name))), "sha256") != []
    third = copy_of_sleep(tmp_path, "three")
    process = spawn(third)

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        async with asyncio.timeout(5):  # a bound to fail on, not a wait
            refused = await attestor.attest(process)

    assert unix_values(refused, "sha256") == [], "fails closed: entries requiring a sha256 do not match"
    assert unix_values(refused, "path") == [str(third)]
    assert hasher.reads == 2
    (warning,) = not_hashed_warnings(caplog)
    assert warning.getMessage() == (
        f"not hashing {third}, the executable of pid {process.pid} uid {os.getuid()}: "
        "the hashing budget is used up; omitting sha256"
    )
    assert (warning.__dict__["uid"], warning.__dict__["executable"]) == (os.getuid(), str(third))

    clock.now += 1  # one more MiB in the bucket
    assert unix_values(await attestor.attest(process), "sha256") == [sha256_of(third)]


async def test_a_chmod_does_not_buy_a_free_hash(spawn: Spawn, tmp_path: Path) -> None:
    # ctime is in the cache key, so a chmod makes the file new to the cache: the new hash costs budget.
    clock = FakeClock()
    hasher = CountingHasher(max_bytes=MIB, budget=budget(clock, per_second=MIB, burst=MIB))
    attestor = UnixAttestor(hasher=hasher)
    binary = copy_of_sleep(tmp_path)
    assert unix_values(await attestor.attest(spawn(binary)), "sha256") == [sha256_of(binary)]

    binary.chmod(0o750)

    assert unix_values(await attestor.attest(spawn(binary)), "sha256") == []
    assert hasher.reads == 1


async def test_cache_hits_are_free_when_the_budget_is_used_up(spawn: Spawn, tmp_path: Path) -> None:
    clock = FakeClock()
    hasher = CountingHasher(max_bytes=MIB, budget=budget(clock, per_second=MIB, burst=MIB))
    attestor = UnixAttestor(hasher=hasher)
    binary = copy_of_sleep(tmp_path)
    await attestor.attest(spawn(binary))  # spends the whole budget
    assert unix_values(await attestor.attest(spawn(copy_of_sleep(tmp_path, "other"))), "sha256") == []

    again = await attestor.attest(spawn(binary))

    assert unix_values(again, "sha256") == [sha256_of(binary)]
    assert hasher.reads == 1


async def test_joining_a_hash_under_way_is_free(spawn: Spawn, tmp_path: Path) -> None:
    # One thread in the default pool: callers' opens of their executables finish in the order asked.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    clock = FakeClock()
    hasher = HeldHasher(max_bytes=MIB, queue_limit=1, budget=budget(clock, per_second=MIB, burst=MIB))
    binary = copy_of_sleep(tmp_path)
    leader, follower, other = spawn(binary), spawn(binary), spawn(copy_of_sleep(tmp_path, "other"))
    executable = executable_of(leader)
    hasher.release.clear()
    first = asyncio.create_task(hasher.sha256(leader, executable))  # takes all the budget and the queue's place
    assert await read_started(hasher)
    second = asyncio.create_task(hasher.sha256(follower, executable))
    third = asyncio.create_task(hasher.sha256(other, executable_of(other)))
    try:
        assert await third is None  # nothing left: refused at once...
        assert not second.done()  # ...while the follower, a step ahead of it, waits for the shared read
    finally:
        hasher.release.set()

    assert await first == await second == sha256_of(binary)
    assert hasher.reads == 1


async def test_one_uid_cannot_take_the_whole_budget(
    spawn: Spawn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    hasher = CountingHasher(max_bytes=MIB, budget=budget(clock, per_second=4 * MIB, burst=4 * MIB, uid_share=0.5))
    binaries = [copy_of_sleep(tmp_path, f"sleep-{i}") for i in range(4)]
    greedy, modest = 4242, 4343
    digests = []
    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        for binary in binaries[:3]:  # the greedy uid asks for three MiB of four...
            process = spawn(binary)
            digests.append(await hasher.sha256(described_as(process, greedy), executable_of(process)))
        process = spawn(binaries[3])  # ...and another uid still gets its share
        modest_digest = await hasher.sha256(described_as(process, modest), executable_of(process))

    assert digests == [sha256_of(binaries[0]), sha256_of(binaries[1]), None]
    assert modest_digest == sha256_of(binaries[3])
    (warning,) = not_hashed_warnings(caplog)
    assert f"uid {greedy}: its uid has used up its share of the hashing budget" in warning.getMessage()
    assert warning.__dict__["uid"] == greedy


def described_as(process: WorkloadProcess, uid: int) -> WorkloadProcess:
    return WorkloadProcess(pid=process.pid, uid=uid, gid=process.gid, start_time=process.start_time)


async def test_a_full_hash_queue_is_not_waited_for(
    spawn: Spawn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hasher = HeldHasher(queue_limit=1)
    attestor = UnixAttestor(hasher=hasher)
    busy = spawn(copy_of_sleep(tmp_path, "busy"))
    hasher.release.clear()
    held = asyncio.create_task(attestor.attest(busy))
    assert await read_started(hasher)
    other = copy_of_sleep(tmp_path, "other")
    process = spawn(other)

    try:
        with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
            async with asyncio.timeout(5):  # a bound to fail on, not a wait
                refused = await attestor.attest(process)
    finally:
        hasher.release.set()

    assert unix_values(refused, "sha256") == []
    (warning,) = not_hashed_warnings(caplog)
    assert warning.getMessage().endswith(f"uid {os.getuid()}: the hash queue is full; omitting sha256")
    assert unix_values(await held, "sha256") != []
    assert unix_values(await attestor.attest(process), "sha256") == [sha256_of(other)], "the queue has room again"


async def test_hashing_leaves_the_default_thread_pool_to_the_rest(spawn: Spawn, tmp_path: Path) -> None:
    # Other attestation steps use asyncio.to_thread: a long hash must not hold them up.
    loop = asyncio.get_running_loop()
    default_pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(default_pool)
    hasher = HeldHasher()
    process = spawn(copy_of_sleep(tmp_path))
    hasher.release.clear()
    held = asyncio.create_task(hasher.sha256(process, executable_of(process)))
    try:
        assert await read_started(hasher)
        async with asyncio.timeout(5):  # a bound to fail on: behind the held hash this would take 10 s
            assert await asyncio.to_thread(lambda: "answered") == "answered"
    finally:
        hasher.release.set()
    await held

    assert [name.startswith("vouchd-hash") for name in hasher.threads] == [True]


def test_a_budget_refills_at_its_rate_and_costs_bytes() -> None:
    clock = FakeClock()
    bucket = budget(clock, per_second=4 * MIB, burst=8 * MIB)

    assert bucket.spend(1000, 6 * MIB) is None  # a sparse 6 MiB file costs 6 MiB, whatever it holds on disk
    assert bucket.spend(1000, 3 * MIB) is HashRefusal.BUDGET_USED
    clock.now += 0.25
    assert bucket.spend(1000, 3 * MIB) is None
    assert bucket.spend(1000, 1) is HashRefusal.BUDGET_USED  # even a tiny file costs MIN_HASH_COST
    clock.now += MIN_HASH_COST / (4 * MIB)
    assert bucket.spend(1000, 1) is None


def test_a_refused_spend_takes_nothing() -> None:
    clock = FakeClock()
    bucket = budget(clock, per_second=4 * MIB, burst=4 * MIB, uid_share=0.5)
    assert bucket.spend(1, 2 * MIB) is None
    assert bucket.spend(2, 2 * MIB) is None

    assert bucket.spend(3, 2 * MIB) is HashRefusal.BUDGET_USED
    clock.now += 0.5  # the shared bucket has 2 MiB again; uid 3's share was never touched

    assert bucket.spend(3, 2 * MIB) is None


def test_each_uid_has_its_share_of_rate_and_burst() -> None:
    clock = FakeClock()
    bucket = budget(clock, per_second=4 * MIB, burst=4 * MIB, uid_share=0.5)

    assert bucket.spend(1, 2 * MIB) is None
    assert bucket.spend(1, MIB) is HashRefusal.UID_SHARE_USED
    clock.now += 0.5  # uid 1 regains 1 MiB (half of 4 MiB/s), the shared bucket 2 MiB
    assert bucket.spend(1, MIB) is None
    assert bucket.spend(1, MIB) is HashRefusal.UID_SHARE_USED
    assert bucket.spend(2, 2 * MIB) is None
    assert bucket.largest_hash == 2 * MIB


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bytes_per_second": 0}, "bytes_per_second must be positive, got 0"),
        ({"burst_bytes": -1}, "burst_bytes must be positive, got -1"),
        ({"uid_share": 0}, "uid_share must be above 0 and at most 1, got 0"),
        ({"uid_share": 1.5}, "uid_share must be above 0 and at most 1, got 1.5"),
    ],
)
def test_bad_budgets_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        HashBudget(**options)  # type: ignore[arg-type]


def test_a_budget_too_small_for_the_size_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^the budget's largest hash \(1048576\) is below max_bytes \(2097152\)$"):
        ExecutableHasher(max_bytes=2 * MIB, budget=HashBudget(burst_bytes=2 * MIB, uid_share=0.5))


# -- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hash_executables": "yes"}, "hash_executables must be true or false"),
        ({"max_hash_bytes": 0}, "max_hash_bytes must be a positive integer"),
        ({"max_hash_bytes": True}, "max_hash_bytes must be a positive integer"),
        ({"hash_bytes_per_second": 0}, "hash_bytes_per_second must be a positive integer"),
        ({"hash_bytes_per_second": "fast"}, "hash_bytes_per_second must be a positive integer"),
        ({"hash_burst_bytes": 1.5}, "hash_burst_bytes must be a positive integer"),
        ({"hash_uid_share": 0}, "hash_uid_share must be a number above 0 and at most 1"),
        ({"hash_uid_share": 2}, "hash_uid_share must be a number above 0 and at most 1"),
        ({"hash_uid_share": True}, "hash_uid_share must be a number above 0 and at most 1"),
        (
            {"max_hash_bytes": 600 * MIB, "hash_burst_bytes": 1000 * MIB},
            rf"hash_burst_bytes times hash_uid_share \({500 * MIB}\) must be at least max_hash_bytes "
            rf"\({600 * MIB}\), or the largest executables could never be hashed",
        ),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^workloadattestor\(unix\): {message}$"):
        UnixAttestor(**options)  # type: ignore[arg-type]


def test_a_whole_uid_share_allows_a_size_limit_as_large_as_the_burst() -> None:
    with pytest.raises(ConfigError, match="must be at least max_hash_bytes"):
        UnixAttestor(max_hash_bytes=1024 * MIB, hash_burst_bytes=1024 * MIB)  # half a burst per uid by default

    UnixAttestor(max_hash_bytes=1024 * MIB, hash_burst_bytes=1024 * MIB, hash_uid_share=1)
