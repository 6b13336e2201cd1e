"""The interpreter attestor against real processes: which script they run, found in their own root, and hashed.

Every process is killed by its pid at the end of its test, and every wait is bounded (BOUND). What is
not installed here is skipped with the reason (ruby: its command lines are tested in
test_attestor_commandline.py only).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.fusefs import FuseFile, fuse_available, mount_fs, mounted, unmount
from tests.processes import described
from vouchd.attestors import AttestorError, WorkloadProcess
from vouchd.attestors.workload import interpreter as interpreter_module
from vouchd.attestors.workload.executable import ExecutableReader
from vouchd.attestors.workload.hashing import MIN_HASH_COST, ExecutableHasher, HashBudget
from vouchd.attestors.workload.interpreter import SELECTOR_KINDS, InterpreterAttestor
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.pool import AttestationPool
from vouchd.attestors.workload.procargs import read_environment
from vouchd.attestors.workload.scriptfile import ProcessFiles, ScriptNotFoundError
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorSchema

BOUND = 10.0  # every wait of these tests is bounded by this; none should come near it
MIB = 1024 * 1024
# The interpreter itself, not the venv's link to it: a process started as this one is in no venv.
PYTHON = str(Path(sys.executable).resolve())
NODE = shutil.which("node")
PERL = shutil.which("perl")
BASH = shutil.which("bash")
DASH = shutil.which("dash")
JAVA = shutil.which("java")
JAVAC = shutil.which("javac")
JAR = shutil.which("jar")

PY_SCRIPT = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
SH_SCRIPT = "echo ready\nread line\n"


def values(selectors: Sequence[object], kind: str) -> list[str]:
    """The values of the `type:key` selectors among `selectors`."""
    selector_type, key = kind.split(":")
    return [s.value for s in selectors if isinstance(s, Selector) and (s.type, s.key) == (selector_type, key)]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


Run = Callable[..., WorkloadProcess]


@pytest.fixture
def run() -> Iterator[Run]:
    """Start a process (stdin a pipe that stays open), optionally wait for its `ready` line, and describe it
    as the Workload API would. Every one is killed by its pid at the end."""
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: Sequence[str], *, cwd: Path | None = None, ready: bool = True,
              env: dict[str, str] | None = None) -> WorkloadProcess:
        child = subprocess.Popen([str(arg) for arg in argv], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        children.append(child)
        wait_until_exec_done(child)
        if ready:
            wait_for_line(child, b"ready")
        return described(child)

    yield start
    for child in children:
        child.kill()
        child.wait(timeout=BOUND)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def wait_until_exec_done(child: subprocess.Popen[bytes]) -> None:
    """Wait until the child's command line is in place: Popen returns as soon as exec(2) has closed the
    child's descriptors, when /proc/<pid>/exe already names the new program but the kernel has not yet
    placed its arguments (it does once the executable and its loader are mapped, microseconds later, or
    more under load). A process attested before then has an empty command line, and so no script."""
    deadline = time.monotonic() + BOUND
    while not Path(f"/proc/{child.pid}/cmdline").read_bytes():
        assert child.poll() is None, f"process {child.pid} exited during exec (status {child.returncode})"
        assert time.monotonic() < deadline, f"process {child.pid} never finished exec"
        time.sleep(0.001)


def wait_for_line(child: subprocess.Popen[bytes], expected: bytes) -> None:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], BOUND)
    assert ready, f"process {child.pid} never said {expected!r}"
    line = child.stdout.readline().strip()
    assert line == expected, f"process {child.pid} said {line!r} (exit status {child.poll()})"


async def attest(attestor: InterpreterAttestor, process: WorkloadProcess) -> Sequence[Selector]:
    async with asyncio.timeout(BOUND):  # a bound to fail on, not a wait
        return await attestor.attest(process)


class CountingHasher(ExecutableHasher):
    """Counts how often file content is actually read."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reads = 0

    def digest_file(self, fd: int) -> str:
        self.reads += 1
        return super().digest_file(fd)


def script_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("not reading the script")]


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the attestor logged, debug lines included (why a process has no script is one)."""
    return [r.getMessage() for r in caplog.records if r.name == "vouchd.attestors.interpreter"]


# -- python -----------------------------------------------------------------------------------------------------------


async def test_two_scripts_of_one_interpreter_and_uid_differ(run: Run, tmp_path: Path) -> None:
    first = write(tmp_path / "agents" / "planner.py", PY_SCRIPT)
    second = write(tmp_path / "agents" / "executor.py", "# the executor\n" + PY_SCRIPT)
    attestor = InterpreterAttestor()

    one = await attest(attestor, run([PYTHON, first]))
    two = await attest(attestor, run([PYTHON, second]))

    assert values(one, "interpreter:name") == values(two, "interpreter:name") == ["python"]
    assert values(one, "script:path") == [str(first)]
    assert values(two, "script:path") == [str(second)]
    assert values(one, "script:sha256") == [sha256_of(first)]
    assert values(two, "script:sha256") == [sha256_of(second)]
    assert values(one, "script:sha256") != values(two, "script:sha256")


async def test_a_relative_script_is_found_from_the_working_directory(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "srv" / "agent.py", PY_SCRIPT)
    (tmp_path / "srv" / "logs").mkdir()

    for name in ("agent.py", "./agent.py", "logs/../agent.py"):
        selectors = await attest(InterpreterAttestor(), run([PYTHON, name], cwd=tmp_path / "srv"))

        assert values(selectors, "script:path") == [str(script)], name
        assert values(selectors, "script:sha256") == [sha256_of(script)], name


async def test_a_symlinked_script_is_named_by_what_it_links_to(run: Run, tmp_path: Path) -> None:
    real = write(tmp_path / "releases" / "v2" / "agent.py", PY_SCRIPT)
    (tmp_path / "current").symlink_to("releases/v2")
    (tmp_path / "agent.py").symlink_to(tmp_path / "current" / "agent.py")

    selectors = await attest(InterpreterAttestor(), run([PYTHON, tmp_path / "agent.py"]))

    assert values(selectors, "script:path") == [str(real)]
    assert values(selectors, "script:sha256") == [sha256_of(real)]


@pytest.mark.parametrize(
    "argv",
    [[PYTHON, "-c", "print('ready', flush=True); import time; time.sleep(60)"], [PYTHON, "-"], [PYTHON]],
    ids=["-c", "stdin", "no arguments"],
)
async def test_code_on_the_command_line_or_stdin_gives_no_script(run: Run, argv: list[str], tmp_path: Path) -> None:
    write(tmp_path / "-", PY_SCRIPT)  # a file named like the argument must not be taken for it
    selectors = await attest(InterpreterAttestor(), run(argv, cwd=tmp_path, ready=argv[1:2] == ["-c"]))

    assert [str(s) for s in selectors] == ["interpreter:name:python"]


async def test_a_script_read_through_dev_stdin_is_not_looked_for_in_proc(run: Run) -> None:
    # /dev/stdin -> /proc/self/fd/0: walked by the agent, /proc/self would be the agent itself.
    selectors = await attest(InterpreterAttestor(), run([PYTHON, "/dev/stdin"], ready=False))

    assert [str(s) for s in selectors] == ["interpreter:name:python"]


async def test_python_m_finds_a_package_in_the_working_directory(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "crew" / "__init__.py", "")
    module = write(tmp_path / "crew" / "planner.py", PY_SCRIPT)
    write(tmp_path / "tool" / "__init__.py", "")
    main = write(tmp_path / "tool" / "__main__.py", PY_SCRIPT)

    as_module = await attest(InterpreterAttestor(), run([PYTHON, "-u", "-m", "crew.planner"], cwd=tmp_path))
    as_package = await attest(InterpreterAttestor(), run([PYTHON, "-mtool"], cwd=tmp_path))

    assert values(as_module, "script:module") == ["crew.planner"]
    assert values(as_module, "script:path") == [str(module)]
    assert values(as_module, "script:sha256") == [sha256_of(module)]
    assert values(as_package, "script:module") == ["tool"]
    assert values(as_package, "script:path") == [str(main)]


async def test_python_m_finds_the_standard_library_of_the_interpreter(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    process = run([PYTHON, "-m", "json.tool"], cwd=tmp_path, ready=False)  # json.tool waits on its stdin

    with caplog.at_level(logging.DEBUG, logger="vouchd.attestors.interpreter"):
        selectors = await attest(InterpreterAttestor(), process)

    stdlib = Path(PYTHON).parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert values(selectors, "script:module") == ["json.tool"], logged(caplog)
    assert values(selectors, "script:path") == [str(stdlib / "json" / "tool.py")], logged(caplog)
    assert values(selectors, "script:sha256") == [sha256_of(stdlib / "json" / "tool.py")], logged(caplog)


async def test_python_m_of_a_module_that_cannot_be_placed_gives_its_name_only(run: Run, tmp_path: Path) -> None:
    # A namespace package (no __init__.py): its portions can be anywhere along the path.
    write(tmp_path / "loose" / "agent.py", PY_SCRIPT)

    selectors = await attest(InterpreterAttestor(), run([PYTHON, "-m", "loose.agent"], cwd=tmp_path))

    assert [str(s) for s in selectors] == ["interpreter:name:python", "script:module:loose.agent"]


async def test_python_m_with_isolation_does_not_look_in_the_working_directory(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # -I leaves the working directory off sys.path: python runs the standard library's json.tool, not this one.
    write(tmp_path / "json" / "__init__.py", "")
    write(tmp_path / "json" / "tool.py", PY_SCRIPT)
    process = run([PYTHON, "-I", "-m", "json.tool"], cwd=tmp_path, ready=False)  # json.tool waits on its stdin

    with caplog.at_level(logging.DEBUG, logger="vouchd.attestors.interpreter"):
        selectors = await attest(InterpreterAttestor(), process)

    stdlib = Path(PYTHON).parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert values(selectors, "script:module") == ["json.tool"], logged(caplog)
    assert values(selectors, "script:path") == [str(stdlib / "json" / "tool.py")], logged(caplog)


async def test_a_process_still_inside_exec_gets_its_interpreter_only(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between exec closing the descriptors (when Popen returns) and the kernel placing the new program's
    # arguments, /proc/<pid>/exe names the interpreter and /proc/<pid>/cmdline reads empty. That moment,
    # too short to hit on purpose, is what an empty read of a real process stands for here.
    process = run([PYTHON, write(tmp_path / "agent.py", PY_SCRIPT)])
    monkeypatch.setattr(interpreter_module, "read_command_line", lambda pid, **_: ((), True))

    with caplog.at_level(logging.DEBUG, logger="vouchd.attestors.interpreter"):
        selectors = await attest(InterpreterAttestor(), process)

    assert [str(s) for s in selectors] == ["interpreter:name:python"]
    assert logged(caplog) == [
        f"no script for pid {process.pid}: its command line is empty: it is still inside exec, or exiting"
    ]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv of the interpreter running the tests, with a module in its site-packages."""
    directory = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", directory], check=True, timeout=60)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    write(directory / "lib" / version / "site-packages" / "installed_agent.py", PY_SCRIPT)
    return directory


async def test_a_venv_python_running_a_script(run: Run, venv: Path, tmp_path: Path) -> None:
    script = write(tmp_path / "agent.py", PY_SCRIPT)

    selectors = await attest(InterpreterAttestor(), run([venv / "bin" / "python", script]))

    assert values(selectors, "interpreter:name") == ["python"]  # the kernel reports the interpreter the link names
    assert values(selectors, "script:path") == [str(script)]
    assert values(selectors, "script:sha256") == [sha256_of(script)]


async def test_python_m_finds_a_module_in_the_venv_it_was_started_from(run: Run, venv: Path, tmp_path: Path) -> None:
    installed = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / \
        "installed_agent.py"

    selectors = await attest(InterpreterAttestor(), run([venv / "bin" / "python", "-m", "installed_agent"],
                                                        cwd=tmp_path))

    assert values(selectors, "script:module") == ["installed_agent"]
    assert values(selectors, "script:path") == [str(installed)]
    assert values(selectors, "script:sha256") == [sha256_of(installed)]


async def test_pythonpath_counts_only_when_the_environment_may_be_read(run: Run, tmp_path: Path) -> None:
    module = write(tmp_path / "lib" / "remote_agent.py", PY_SCRIPT)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path / "lib"), "API_TOKEN": "s3cr3t"}
    process = run([PYTHON, "-m", "remote_agent"], cwd=tmp_path, env=env)

    without = await attest(InterpreterAttestor(), process)
    with_environment = await attest(InterpreterAttestor(read_environment=True), process)

    assert [str(s) for s in without] == ["interpreter:name:python", "script:module:remote_agent"]
    assert values(with_environment, "script:path") == [str(module)]
    assert read_environment(process.pid) == {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path / "lib")}


# -- other interpreters ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_a_node_script(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "server.js", "console.log('ready');\nsetTimeout(() => {}, 60000);\n")
    attestor = InterpreterAttestor()

    named = await attest(attestor, run([NODE, "--no-warnings", "server.js"], cwd=tmp_path))
    without_suffix = await attest(attestor, run([NODE, "server"], cwd=tmp_path))  # node runs server.js

    for selectors in (named, without_suffix):
        assert values(selectors, "interpreter:name") == ["node"]
        assert values(selectors, "script:path") == [str(script)]
        assert values(selectors, "script:sha256") == [sha256_of(script)]


@pytest.mark.skipif(PERL is None, reason="perl is not installed")
async def test_a_perl_script(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "watch.pl", '$| = 1;\nprint "ready\\n";\nsleep 60;\n')

    selectors = await attest(InterpreterAttestor(), run([PERL, "-w", "-Mstrict", script]))

    assert values(selectors, "interpreter:name") == ["perl"]
    assert values(selectors, "script:path") == [str(script)]
    assert values(selectors, "script:sha256") == [sha256_of(script)]


@pytest.mark.parametrize(("shell", "name"), [(BASH, "bash"), (DASH, "sh")])
async def test_a_shell_script(run: Run, tmp_path: Path, shell: str | None, name: str) -> None:
    if shell is None:
        pytest.skip(f"no {name} here")
    script = write(tmp_path / "job.sh", SH_SCRIPT)

    selectors = await attest(InterpreterAttestor(), run([shell, "-e", "-o", "nounset", "job.sh"], cwd=tmp_path))
    command = await attest(InterpreterAttestor(), run([shell, "-c", SH_SCRIPT]))

    assert values(selectors, "interpreter:name") == [name]
    assert values(selectors, "script:path") == [str(script)]
    assert values(selectors, "script:sha256") == [sha256_of(script)]
    assert [str(s) for s in command] == [f"interpreter:name:{name}"]


@pytest.fixture(scope="module")
def jar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jar whose main class says ready and sleeps, built with javac and jar (a few seconds)."""
    if JAVA is None or JAVAC is None or JAR is None:
        pytest.skip("java, javac or jar is not installed")
    directory = tmp_path_factory.mktemp("java")
    write(directory / "Sleeper.java", 'public class Sleeper { public static void main(String[] a) throws Exception '
                                      '{ System.out.println("ready"); System.out.flush(); Thread.sleep(60000); } }\n')
    subprocess.run([JAVAC, "-d", directory / "classes", directory / "Sleeper.java"], check=True, timeout=120)
    subprocess.run([JAR, "--create", "--file", directory / "sleeper.jar", "--main-class", "Sleeper",
                    "-C", directory / "classes", "."], check=True, timeout=120)
    return directory / "sleeper.jar"


async def test_java_jar(run: Run, jar: Path) -> None:
    assert JAVA is not None
    selectors = await attest(InterpreterAttestor(), run([JAVA, "-Xmx64m", "-Dapp=1", "-jar", jar.name],
                                                        cwd=jar.parent))
    main_class = await attest(InterpreterAttestor(), run([JAVA, "-cp", jar, "Sleeper"]))

    assert values(selectors, "interpreter:name") == ["java"]
    assert values(selectors, "script:path") == [str(jar)]
    assert values(selectors, "script:sha256") == [sha256_of(jar)]
    assert [str(s) for s in main_class] == ["interpreter:name:java"]  # a class name is not a file


async def test_a_process_that_is_no_interpreter_gets_nothing(run: Run) -> None:
    process = run(["sleep", "60"], ready=False)

    assert await attest(InterpreterAttestor(), process) == []


async def test_only_the_interpreters_configured_are_described(run: Run, tmp_path: Path) -> None:
    process = run([PYTHON, write(tmp_path / "agent.py", PY_SCRIPT)])

    assert await attest(InterpreterAttestor(interpreters=["node", "bash"]), process) == []
    assert values(await attest(InterpreterAttestor(interpreters=["python"]), process), "interpreter:name") == [
        "python"]


# -- the caller's own root --------------------------------------------------------------------------------------------


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    """A root with dash and the libraries it needs, for processes run by chroot(8)."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    if DASH is None or shutil.which("chroot") is None or shutil.which("ldd") is None:
        pytest.skip("no dash, chroot or ldd here")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(DASH, root / "bin" / "dash")
    listed = subprocess.run(["ldd", DASH], capture_output=True, text=True, timeout=BOUND, check=True).stdout
    for library in (word for line in listed.splitlines() for word in line.split() if word.startswith("/")):
        target = root / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(library).resolve(), target)
    return root


def in_root(chroot: Path, *argv: str) -> list[str]:
    return ["chroot", str(chroot), "/bin/dash", *argv]


async def test_an_absolute_script_name_is_found_in_the_process_root(run: Run, chroot: Path) -> None:
    script = write(chroot / "job.sh", SH_SCRIPT + "# the one inside\n")
    assert not Path("/job.sh").exists()

    selectors = await attest(InterpreterAttestor(), run(in_root(chroot, "/job.sh")))

    assert values(selectors, "interpreter:name") == ["sh"]
    assert values(selectors, "script:path") == ["/job.sh"]  # as the process names it
    assert values(selectors, "script:sha256") == [sha256_of(script)]


async def test_a_relative_script_name_is_found_from_the_working_directory_in_the_root(
    run: Run, chroot: Path
) -> None:
    script = write(chroot / "work" / "job.sh", SH_SCRIPT)

    selectors = await attest(InterpreterAttestor(), run(in_root(chroot, "-c", "cd /work && exec /bin/dash ./job.sh")))

    assert values(selectors, "script:path") == ["/work/job.sh"]
    assert values(selectors, "script:sha256") == [sha256_of(script)]


@pytest.mark.parametrize("link", ["/etc/passwd", "../../../../../../../../etc/passwd"])
async def test_a_symlink_out_of_the_root_resolves_inside_it(run: Run, chroot: Path, link: str) -> None:
    inside = write(chroot / "etc" / "passwd", SH_SCRIPT + "# not the host's passwd\n")
    (chroot / "app").mkdir()
    (chroot / "app" / "job.sh").symlink_to(link)

    selectors = await attest(InterpreterAttestor(), run(in_root(chroot, "/app/job.sh")))

    assert values(selectors, "script:path") == ["/etc/passwd"]
    assert values(selectors, "script:sha256") == [sha256_of(inside)]
    assert values(selectors, "script:sha256") != [sha256_of(Path("/etc/passwd"))]


# -- what is not read, or not hashed ---------------------------------------------------------------------------------


@pytest.fixture
def fuse_script(tmp_path: Path, run: Run) -> Iterator[tuple[Path, FuseFile]]:
    """A python script served from a FUSE mount of this test's own. It asks for `run` so that it ends first:
    the mount goes before the processes are killed."""
    if (why := fuse_available()) is not None:
        pytest.skip(f"no FUSE mount on this machine: {why}")
    target = tmp_path / "fuse"
    target.mkdir()
    served = FuseFile("agent.py", PY_SCRIPT.encode())
    try:
        with mounted(target, served, fs_type="fuse.vouchdtest"):
            yield target, served
    except PermissionError as err:
        pytest.skip(f"cannot mount FUSE here: {err}")


async def test_a_script_on_fuse_is_neither_opened_nor_asked_about(
    fuse_script: tuple[Path, FuseFile], run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    target, served = fuse_script
    process = run([PYTHON, "-I", target / "agent.py"])
    served.stall()  # from now on the server answers nothing about the file: any read of it would hang
    asked = served.requests

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.interpreter"):
        selectors = await attest(InterpreterAttestor(), process)

    assert time.monotonic() - started < 1.0, "nothing was waited for"
    assert [str(s) for s in selectors] == ["interpreter:name:python"]
    assert served.requests == asked, "the agent asked the FUSE server for nothing"
    (warning,) = script_warnings(caplog)
    assert warning.getMessage() == (
        f"not reading the script of pid {process.pid} uid {process.uid}: it lives on a FUSE file system "
        f"(fuse.vouchdtest at {target}), whose server decides when a read returns; omitting script:path and "
        "script:sha256"
    )
    assert (warning.__dict__["uid"], warning.__dict__["mount_point"]) == (process.uid, str(target))


async def test_a_script_above_the_size_limit_is_not_hashed(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = write(tmp_path / "big.py", PY_SCRIPT + "#" * 2000 + "\n")
    hasher = CountingHasher(max_bytes=1000)

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        process = run([PYTHON, script])
        selectors = await attest(InterpreterAttestor(hasher=hasher), process)

    assert values(selectors, "script:path") == [str(script)]
    assert values(selectors, "script:sha256") == []
    assert hasher.reads == 0
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("not hashing")] == [
        f"not hashing {script}, the script of pid {process.pid} uid {process.uid}: "
        f"{script.stat().st_size} bytes is above the 1000 limit; omitting sha256"
    ]


async def test_a_deleted_script_gives_no_path_and_no_hash(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "agent.py", PY_SCRIPT)
    process = run([PYTHON, script])
    script.unlink()

    selectors = await attest(InterpreterAttestor(), process)

    assert [str(s) for s in selectors] == ["interpreter:name:python"]


async def test_hashing_can_be_switched_off(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "agent.py", PY_SCRIPT)
    hasher = CountingHasher()

    selectors = await attest(InterpreterAttestor(hash_scripts=False, hasher=hasher), run([PYTHON, script]))

    assert values(selectors, "script:path") == [str(script)]
    assert values(selectors, "script:sha256") == []
    assert hasher.reads == 0


async def test_scripts_and_executables_share_the_unix_attestors_cache_and_budget(run: Run, tmp_path: Path) -> None:
    # A budget that holds the interpreter's hash and one script's, and never refills (the clock stands still).
    interpreter_cost = max(Path(PYTHON).stat().st_size, MIN_HASH_COST)
    burst = interpreter_cost + MIN_HASH_COST
    budget = HashBudget(bytes_per_second=MIB, burst_bytes=burst, uid_share=1.0, clock=lambda: 1000.0)
    unix = UnixAttestor(hasher=CountingHasher(max_bytes=burst, budget=budget))
    hasher = unix.hasher
    assert isinstance(hasher, CountingHasher)
    attestor = InterpreterAttestor(hasher=hasher)
    first = write(tmp_path / "one.py", PY_SCRIPT)
    second = write(tmp_path / "two.py", "# another\n" + PY_SCRIPT)
    process = run([PYTHON, first])

    assert values(await unix.attest(process), "unix:sha256") == [sha256_of(Path(PYTHON))]
    one = await attest(attestor, process)
    again = await attest(attestor, run([PYTHON, first]))  # another process, the same file: from the cache
    started = time.monotonic()
    refused = await attest(attestor, run([PYTHON, second]))

    assert values(one, "script:sha256") == values(again, "script:sha256") == [sha256_of(first)]
    assert hasher.reads == 2, "the interpreter and the first script, each read once"
    assert values(refused, "script:sha256") == [], "the one budget is spent: no sha256, and no wait for a refill"
    assert values(refused, "script:path") == [str(second)]
    assert time.monotonic() - started < 1.0


async def test_a_rewritten_command_line_is_believed_which_is_why_script_selectors_never_stand_alone(
    run: Run, tmp_path: Path
) -> None:
    # The known limit (docs/design.md §6): a process writes its own command line. This one runs real.py and
    # then overwrites its argv in its own memory, as setproctitle does, to name fake.py (the same length, so
    # nothing else moves). The attestor can only believe it: entries therefore always pair script selectors
    # with a kernel-anchored one.
    fake = write(tmp_path / "fake.py", "print('an innocent script')\n")
    write(tmp_path / "real.py", (
        "import time\n"
        "with open('/proc/self/stat') as stat:\n"
        "    fields = stat.read().rsplit(')', 1)[1].split()\n"
        "start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end: fields 48 and 49\n"
        "with open('/proc/self/mem', 'r+b') as memory:\n"
        "    memory.seek(start)\n"
        "    argv = memory.read(end - start)\n"
        "    memory.seek(start)\n"
        "    memory.write(argv.replace(b'real.py', b'fake.py'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    ))
    process = run([PYTHON, "real.py"], cwd=tmp_path)

    selectors = await attest(InterpreterAttestor(), process)

    assert values(selectors, "script:path") == [str(fake)]
    assert values(selectors, "script:sha256") == [sha256_of(fake)]


async def test_a_command_line_longer_than_the_agent_reads_gives_no_script(run: Run, tmp_path: Path) -> None:
    script = write(tmp_path / "agent.py", PY_SCRIPT)
    padding = ["-X", "a" * 100_000, "-X", "b" * 100_000]  # python keeps unknown -X options

    selectors = await attest(InterpreterAttestor(), run([PYTHON, *padding, script]))

    assert [str(s) for s in selectors] == ["interpreter:name:python"]


async def test_no_ptrace_access_gives_no_selectors(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process = run([PYTHON, write(tmp_path / "agent.py", PY_SCRIPT)])
    readlink = os.readlink

    def without_access(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> str:
        if str(path) == f"/proc/{process.pid}/exe":
            raise PermissionError(13, "Permission denied", str(path))
        return readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", without_access)

    assert await attest(InterpreterAttestor(), process) == []


async def test_an_exited_process_is_an_attestor_error() -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=BOUND)
    gone = WorkloadProcess(pid=child.pid, uid=0, gid=0, start_time=1)

    with pytest.raises(AttestorError, match=rf"^workloadattestor\(interpreter\): process {child.pid} has exited$"):
        await InterpreterAttestor().attest(gone)


async def test_its_threads_hanging_is_reported_to_the_watchdog(run: Run, tmp_path: Path) -> None:
    reader = ExecutableReader(pool=AttestationPool(name="vouchd-test", threads=1, uid_threads=1, uid_waiting=1))
    attestor = InterpreterAttestor(hasher=ExecutableHasher(reader=reader))
    process = run([PYTHON, write(tmp_path / "agent.py", PY_SCRIPT)])
    running, release = threading.Event(), threading.Event()

    def hang() -> None:
        running.set()
        release.wait(BOUND)

    held = asyncio.create_task(reader.pool.run(process.uid, hang))  # no wait limit: it holds the thread
    try:
        assert await asyncio.to_thread(running.wait, BOUND)
        assert attestor.stalled(older_than=60) is None
        problem = attestor.stalled(older_than=0)
        assert problem is not None
        assert problem.startswith("workloadattestor(interpreter): all 1 vouchd-test threads have been busy")
        selectors = await attest(attestor, process)  # its uid's thread is taken: no script, no wait beyond the limit
        assert [str(s) for s in selectors] == ["interpreter:name:python"]
    finally:
        release.set()
    await held


# -- resolving names inside a root, step by step --------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["openat2", "without openat2"])
def files(request: pytest.FixtureRequest) -> Iterator[ProcessFiles]:
    """This process's own files, walked with openat2 or as on a kernel without it."""
    with ProcessFiles(os.getpid(), mounts=MountTables(), use_openat2=request.param) as opened:
        yield opened


def test_dot_dot_never_climbs_above_the_root(files: ProcessFiles, tmp_path: Path) -> None:
    script = write(tmp_path / "agent.py", PY_SCRIPT)

    found = files.open_file("/../../.." + str(script))
    try:
        assert (found.path, found.identity.inode) == (str(script), script.stat().st_ino)
    finally:
        found.close()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("loop.py", "too many levels of symbolic links"),
        ("agent.py/more", "a component of its name is not a directory"),
        ("agent.py/", "a component of its name is not a directory"),
        ("missing.py", "no such file"),
        ("empty-link.py", "no such file"),
        ("folder", "it is not a regular file"),
    ],
)
def test_names_that_lead_to_no_regular_file(files: ProcessFiles, tmp_path: Path, name: str, problem: str) -> None:
    write(tmp_path / "agent.py", PY_SCRIPT)
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.py").symlink_to("loop2.py")
    (tmp_path / "loop2.py").symlink_to("loop.py")
    (tmp_path / "empty-link.py").symlink_to("nowhere")

    with pytest.raises(ScriptNotFoundError, match=f"^{problem}$"):
        files.open_file(f"{tmp_path}/{name}")


def test_names_leading_into_proc_are_not_walked(files: ProcessFiles) -> None:
    with pytest.raises(ScriptNotFoundError, match="/proc, whose links mean the agent there"):
        files.open_file("/dev/stdin")


def test_a_walk_checks_each_mount_it_enters(files: ProcessFiles, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    target = tmp_path / "tmpfs"
    target.mkdir()
    mount_fs("vouchd-test", target, "tmpfs", "size=1m")
    try:
        script = write(target / "deep" / "agent.py", PY_SCRIPT)
        found = files.open_file(str(script))
        found.close()
        assert found.path == str(script)
    finally:
        unmount(target)


# -- options and declarations -----------------------------------------------------------------------------------------

SCHEMA = SelectorSchema({"interpreter": InterpreterAttestor.produces}, described_as="a selector")


def test_the_declaration_lists_every_key_attest_emits() -> None:
    assert InterpreterAttestor.produces is SELECTOR_KINDS
    assert [(kind.type, kind.key) for kind in SELECTOR_KINDS] == [
        ("interpreter", "name"), ("script", "path"), ("script", "sha256"), ("script", "module")]


@pytest.mark.parametrize(
    "text",
    ["interpreter:name:python", "interpreter:name:sh", "script:path:/srv/agent/main.py",
     "script:path:/opt/my agent (v2)/run.py", "script:sha256:" + "0f" * 32, "script:module:agent",
     "script:module:crew.planner_v2", "script:module:modüle"],
)
def test_values_the_attestor_can_emit_are_accepted(text: str) -> None:
    assert SCHEMA.problem(Selector.parse(text)) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("interpreter:name:python3", "an interpreter name is one of: bash, java, node, perl, python, ruby, sh"),
        ("interpreter:name:zsh", "an interpreter name is one of: bash, java, node, perl, python, ruby, sh"),
        ("script:path:agent.py", "a script path is absolute and normalised, as the process names it inside its "
                                 "root, e.g. script:path:/srv/agent/main.py"),
        ("script:path:/srv/../agent.py", "a script path is absolute and normalised, as the process names it inside "
                                         "its root, e.g. script:path:/srv/agent/main.py"),
        ("script:sha256:" + "0F" * 32, "a sha256 is 64 lowercase hex digits, as sha256sum prints it"),
        ("script:module:crew/planner", "a module is a dotted python name, e.g. script:module:agent.main"),
        ("script:module:.relative", "a module is a dotted python name, e.g. script:module:agent.main"),
        ("script:module:1st", "a module is a dotted python name, e.g. script:module:agent.main"),
    ],
)
def test_values_the_attestor_never_emits_are_named(text: str, problem: str) -> None:
    assert SCHEMA.problem(Selector.parse(text)) == f"{text}: {problem}"


async def test_what_attest_emits_passes_its_own_declaration(run: Run, tmp_path: Path) -> None:
    write(tmp_path / "crew" / "__init__.py", "")
    write(tmp_path / "crew" / "my agent (v2).py", PY_SCRIPT)
    write(tmp_path / "crew" / "planner.py", PY_SCRIPT)
    selectors = [
        *await attest(InterpreterAttestor(), run([PYTHON, "crew/my agent (v2).py"], cwd=tmp_path)),
        *await attest(InterpreterAttestor(), run([PYTHON, "-m", "crew.planner"], cwd=tmp_path)),
    ]

    assert {(s.type, s.key) for s in selectors} == {(kind.type, kind.key) for kind in SELECTOR_KINDS}
    assert [(str(s), SCHEMA.problem(s)) for s in selectors] == [(str(s), None) for s in selectors]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interpreters": []}, "interpreters must be a non-empty list of: bash, java, node, perl, python, ruby, sh"),
        ({"interpreters": "python"}, "interpreters must be a non-empty list of: bash, java, node, perl, python, "
                                     "ruby, sh"),
        ({"interpreters": ["python", "php"]}, "interpreters names 'php', which is none of: bash, java, node, perl, "
                                              "python, ruby, sh"),
        ({"hash_scripts": "yes"}, "hash_scripts must be true or false"),
        ({"read_environment": 1}, "read_environment must be true or false"),
        ({"hasher": object()}, "hasher must be an ExecutableHasher"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^workloadattestor\(interpreter\): {message}$"):
        InterpreterAttestor(**options)  # type: ignore[arg-type]
