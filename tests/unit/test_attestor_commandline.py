"""What command lines say interpreters run: each interpreter's own option grammar, table by table.

The cases marked as checked were run against the installed python 3.11, node 20, perl 5.36, bash 5.2
and dash; ruby is not installed here, its cases follow ruby.c. A command line the parser cannot be
sure of gives NoScript: no script rather than a wrong one.
"""

from __future__ import annotations

import pytest

from vouchd.attestors.workload.commandline import (
    INTERPRETERS,
    Invocation,
    Module,
    NoScript,
    Script,
    entry_point,
    executable_interpreter,
    identify,
    split_command_line,
)

NODE_SUFFIXES = (".js", ".json", ".node")


def parsed(interpreter: str, argv: list[str], *, complete: bool = True) -> object:
    """What `argv` runs, as `interpreter` parses it; NoScript reduced to its type (the reason is for logs)."""
    found = entry_point(Invocation(interpreter, argv[0], tuple(argv[1:])), complete=complete)
    return NoScript if isinstance(found, NoScript) else found


def ids(cases: list[tuple[list[str], object]]) -> list[str]:
    return [" ".join(argv) or "(empty)" for argv, _ in cases]


# -- which interpreter: the executable's name, never argv[0] ------------------------------------------------------

EXECUTABLES = [
    ("/usr/bin/python3", "python"),
    ("/usr/bin/python3.11", "python"),
    ("/usr/local/bin/python3.12d", "python"),
    ("/usr/bin/python3.13t", "python"),
    ("/usr/bin/python", "python"),
    ("/root/.pyenv/versions/3.11.7/bin/python3.11", "python"),
    ("/usr/bin/python3.11 (deleted)", "python"),  # upgraded under a running process: still what it exec'd
    ("/usr/bin/node", "node"),
    ("/usr/bin/nodejs", "node"),
    ("/usr/bin/ruby", "ruby"),
    ("/usr/bin/ruby3.1", "ruby"),
    ("/usr/bin/perl", "perl"),
    ("/usr/bin/perl5.36.0", "perl"),
    ("/usr/bin/bash", "bash"),
    ("/usr/bin/dash", "sh"),
    ("/bin/sh", "sh"),
    ("/bin/ash", "sh"),
    ("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "java"),
    ("/usr/bin/sleep", None),
    ("/usr/bin/python3-config", None),
    ("/usr/bin/zsh", None),
    ("/usr/bin/javac", None),
    ("/usr/bin/bash5", None),
    ("/usr/bin/busybox", None),  # only its argv says which applet it is: see identify
]


@pytest.mark.parametrize(("executable", "interpreter"), EXECUTABLES)
def test_the_executable_names_the_interpreter(executable: str, interpreter: str | None) -> None:
    assert executable_interpreter(executable) == interpreter
    invocation = identify(executable, ["whatever-argv0-says", "x"])
    assert (invocation.interpreter if invocation is not None else None) == interpreter


def test_argv0_does_not_make_a_process_an_interpreter() -> None:
    assert identify("/usr/bin/sleep", ["python3", "app.py"]) is None
    assert identify("/usr/bin/python3.11", ["bash", "app.py"]) == Invocation("python", "bash", ("app.py",))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sh", "run.sh"], Invocation("sh", "sh", ("run.sh",))),
        (["/bin/ash", "-e", "run.sh"], Invocation("sh", "/bin/ash", ("-e", "run.sh"))),
        (["busybox", "sh", "run.sh"], Invocation("sh", "busybox", ("run.sh",))),
        (["sleep", "10"], None),
        (["busybox", "sleep", "10"], None),
        (["busybox"], None),
        ([], None),
    ],
)
def test_busybox_is_a_shell_only_as_its_sh_applet(argv: list[str], expected: Invocation | None) -> None:
    assert identify("/bin/busybox", argv) == expected


def test_every_interpreter_has_a_parser() -> None:
    for interpreter in INTERPRETERS:
        entry_point(Invocation(interpreter, interpreter, ()))


# -- the command line as /proc holds it -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "truncated", "arguments"),
    [
        (b"python3\0app.py\0", False, ("python3", "app.py")),
        (b"", False, ()),
        (b"\0", False, ("",)),
        (b"a\0\0b\0", False, ("a", "", "b")),
        (b"python3\0app.py", False, ("python3", "app.py")),  # rewritten without the final NUL
        (b"python3\0app.py\0pa", True, ("python3", "app.py")),  # the cut-off last argument is dropped
        (b"python3\0caf\xe9.py\0", False, ("python3", "caf\udce9.py")),  # kept as the bytes it names
    ],
)
def test_command_lines_split_at_nul(raw: bytes, truncated: bool, arguments: tuple[str, ...]) -> None:
    assert split_command_line(raw, truncated=truncated) == arguments


def test_a_cut_command_line_that_runs_out_gives_no_script() -> None:
    assert parsed("python", ["python3", "-u"], complete=False) is NoScript
    assert parsed("python", ["python3", "-u", "app.py"], complete=False) == Script("app.py")


# -- python -------------------------------------------------------------------------------------------------------

PYTHON = [
    (["python3", "app.py"], Script("app.py")),
    (["python3", "app.py", "-c", "x"], Script("app.py")),  # what follows the script is the script's
    (["python3", "-u", "app.py"], Script("app.py")),
    (["python3", "-uB", "app.py"], Script("app.py")),
    (["python3", "-OO", "-q", "app.py"], Script("app.py")),
    (["python3", "-i", "app.py"], Script("app.py")),
    (["python3", "-W", "ignore", "app.py"], Script("app.py")),  # checked
    (["python3", "-Wignore", "app.py"], Script("app.py")),  # checked
    (["python3", "-bW", "error", "app.py"], Script("app.py")),
    (["python3", "-X", "dev", "app.py"], Script("app.py")),  # checked
    (["python3", "-Xfrozen_modules=off", "app.py"], Script("app.py")),
    (["python3", "--check-hash-based-pycs", "always", "app.py"], Script("app.py")),  # checked
    (["python3", "--", "app.py"], Script("app.py")),  # checked
    (["python3", "--", "-app.py"], Script("-app.py")),
    (["python3", "-c", "print(1)", "app.py"], NoScript),
    (["python3", "-uBc", "code"], NoScript),  # checked
    (["python3", "-ccode"], NoScript),
    (["python3", "-X", "-c"], NoScript),  # -X took "-c": then the program comes from stdin
    (["python3", "-"], NoScript),
    (["python3"], NoScript),
    (["python3", "--"], NoScript),
    (["python3", ""], NoScript),
    (["python3", "-h"], NoScript),
    (["python3", "--version"], NoScript),
    (["python3", "-W"], NoScript),
    (["python3", "-m"], NoScript),
    (["python3", "-m", "my-module"], NoScript),  # not a dotted name
    (["python3", "--check-hash-based-pycs=always", "app.py"], NoScript),  # checked: python refuses it
    (["python3", "--frobnicate", "app.py"], NoScript),
    (["python3", "-J", "app.py"], NoScript),  # checked: reserved for Jython
    (["python3", "-Z", "app.py"], NoScript),
    (["python3", "-uZ", "app.py"], NoScript),
    (["python3", "-m", "pkg.mod"], Module("pkg.mod")),
    (["python3", "-mpkg.mod", "arg"], Module("pkg.mod")),  # checked
    (["python3", "-u", "-m", "agent", "app.py"], Module("agent")),
    (["python3", "-m", "modüle"], Module("modüle")),
    (["python3", "-I", "-m", "x"], Module("x", search_cwd=False, use_environment=False, user_site=False)),
    (["python3", "-Im", "x"], Module("x", search_cwd=False, use_environment=False, user_site=False)),
    (["python3", "-P", "-m", "x"], Module("x", search_cwd=False)),
    (["python3", "-E", "-s", "-m", "x"], Module("x", use_environment=False, user_site=False)),
    (["python3", "-m", "x", "-I"], Module("x")),  # after the module: its own arguments
]


@pytest.mark.parametrize(("argv", "expected"), PYTHON, ids=ids(PYTHON))
def test_python(argv: list[str], expected: object) -> None:
    assert parsed("python", argv) == expected


# -- node -----------------------------------------------------------------------------------------------------------

NODE = [
    (["node", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "app"], Script("app", NODE_SUFFIXES)),  # checked: node runs app.js
    (["node", "-r", "dotenv/config", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--require", "ts-node/register", "app.ts"], Script("app.ts", NODE_SUFFIXES)),
    (["node", "--require=x", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--import", "tsx", "app.ts"], Script("app.ts", NODE_SUFFIXES)),
    (["node", "--loader", "ts-node/esm", "app.ts"], Script("app.ts", NODE_SUFFIXES)),
    (["node", "--experimental-loader=x", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "-C", "development", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--conditions", "development", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--inspect-port", "9230", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--title", "svc", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--env-file", ".env", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--max-old-space-size=4096", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--max_old_space_size=4096", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--no-warnings", "--enable-source-maps", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked
    (["node", "--inspect", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--inspect=0.0.0.0:9229", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--watch", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "-i", "app.js"], Script("app.js", NODE_SUFFIXES)),  # checked: runs the script
    (["node", "--", "app.js"], Script("app.js", NODE_SUFFIXES)),
    (["node", "--", "-app.js"], Script("-app.js", NODE_SUFFIXES)),
    (["node", "app.js", "-e", "x"], Script("app.js", NODE_SUFFIXES)),
    (["node", "-e", "code"], NoScript),
    (["node", "-e", "code", "app.js"], NoScript),  # checked: app.js is an argument of the code
    (["node", "--eval=code"], NoScript),
    (["node", "-p", "1"], NoScript),
    (["node", "-pe", "1"], NoScript),  # checked
    (["node", "--print", "1"], NoScript),
    (["node"], NoScript),
    (["node", "-"], NoScript),
    (["node", "--test", "t.js"], NoScript),
    (["node", "--check", "app.js"], NoScript),
    (["node", "--snapshot-blob", "snap.blob", "arg"], NoScript),
    (["node", "-r"], NoScript),
    (["node", "--frobnicate", "app.js"], NoScript),  # checked: node refuses it
    (["node", "--max-old-space-size", "4096", "app.js"], NoScript),  # checked: V8 takes =value only
    (["node", "-x", "app.js"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), NODE, ids=ids(NODE))
def test_node(argv: list[str], expected: object) -> None:
    assert parsed("node", argv) == expected


# -- ruby (not installed here: these follow ruby.c) ------------------------------------------------------------------

RUBY = [
    (["ruby", "app.rb"], Script("app.rb")),
    (["ruby", "-w", "app.rb"], Script("app.rb")),
    (["ruby", "-wd", "app.rb"], Script("app.rb")),
    (["ruby", "-I", "lib", "app.rb"], Script("app.rb")),
    (["ruby", "-Ilib", "app.rb"], Script("app.rb")),
    (["ruby", "-r", "json", "app.rb"], Script("app.rb")),
    (["ruby", "-rjson", "app.rb"], Script("app.rb")),
    (["ruby", "-wrjson", "app.rb"], Script("app.rb")),
    # -C changes directory first: the name is relative to the working directory the process now has.
    (["ruby", "-C", "/srv", "app.rb"], Script("app.rb")),
    (["ruby", "-C/srv", "app.rb"], Script("app.rb")),
    (["ruby", "-E", "UTF-8", "app.rb"], Script("app.rb")),
    (["ruby", "-EUTF-8:UTF-8", "app.rb"], Script("app.rb")),
    (["ruby", "-x", "app.rb"], Script("app.rb")),
    (["ruby", "-x/tmp", "app.rb"], Script("app.rb")),
    (["ruby", "-T1", "app.rb"], Script("app.rb")),
    (["ruby", "-W0", "app.rb"], Script("app.rb")),
    (["ruby", "-W:no-deprecated", "app.rb"], Script("app.rb")),
    (["ruby", "-0777", "app.rb"], Script("app.rb")),
    (["ruby", "-Ku", "app.rb"], Script("app.rb")),
    (["ruby", "-i.bak", "app.rb"], Script("app.rb")),
    (["ruby", "--enable=frozen-string-literal", "app.rb"], Script("app.rb")),
    (["ruby", "--enable", "jit", "app.rb"], Script("app.rb")),
    (["ruby", "--disable-gems", "app.rb"], Script("app.rb")),
    (["ruby", "--yjit", "app.rb"], Script("app.rb")),
    (["ruby", "--yjit-exec-mem-size=64", "app.rb"], Script("app.rb")),
    (["ruby", "-S", "./bin/rake"], Script("./bin/rake")),
    (["ruby", "--", "app.rb"], Script("app.rb")),
    (["ruby", "-e", "puts 1"], NoScript),
    (["ruby", "-ne", "print"], NoScript),
    (["ruby", "-S", "rake"], NoScript),  # found along PATH
    (["ruby"], NoScript),
    (["ruby", "-"], NoScript),
    (["ruby", ""], NoScript),
    (["ruby", "-I"], NoScript),
    (["ruby", "--version"], NoScript),
    (["ruby", "-h"], NoScript),
    (["ruby", "-Z", "app.rb"], NoScript),
    (["ruby", "--frobnicate", "app.rb"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), RUBY, ids=ids(RUBY))
def test_ruby(argv: list[str], expected: object) -> None:
    assert parsed("ruby", argv) == expected


# -- perl -----------------------------------------------------------------------------------------------------------

PERL = [
    (["perl", "app.pl"], Script("app.pl")),
    (["perl", "-w", "app.pl"], Script("app.pl")),
    (["perl", "-wT", "app.pl"], Script("app.pl")),
    (["perl", "-I", "lib", "app.pl"], Script("app.pl")),  # checked
    (["perl", "-Ilib", "app.pl"], Script("app.pl")),
    (["perl", "-Mstrict", "app.pl"], Script("app.pl")),  # checked
    (["perl", "-MList::Util=sum", "app.pl"], Script("app.pl")),
    (["perl", "-mstrict", "app.pl"], Script("app.pl")),
    (["perl", "-l0", "app.pl"], Script("app.pl")),
    (["perl", "-0777", "app.pl"], Script("app.pl")),
    (["perl", "-0x1FF", "app.pl"], Script("app.pl")),
    (["perl", "-i.bak", "app.pl"], Script("app.pl")),
    (["perl", "-CSDA", "app.pl"], Script("app.pl")),
    (["perl", "-Fsomething", "app.pl"], Script("app.pl")),
    (["perl", "-d:NYTProf", "app.pl"], Script("app.pl")),
    (["perl", "-dt", "app.pl"], Script("app.pl")),
    (["perl", "-d", "app.pl"], Script("app.pl")),
    (["perl", "-x", "app.pl"], Script("app.pl")),
    (["perl", "-x", "/tmp", "app.pl"], Script("/tmp")),  # checked: -x's directory is attached only
    (["perl", "-x/tmp", "/srv/app.pl"], Script("/srv/app.pl")),
    (["perl", "-S", "./app.pl"], Script("./app.pl")),
    (["perl", "--", "app.pl"], Script("app.pl")),
    (["perl", "-x/tmp", "app.pl"], NoScript),  # it changed directory after opening app.pl
    (["perl", "-S", "app.pl"], NoScript),  # found along PATH
    (["perl", "-M", "strict", "app.pl"], NoScript),  # checked: "Missing argument to -M"
    (["perl", "-m", "strict", "app.pl"], NoScript),  # checked
    (["perl", "-e", "print 1"], NoScript),
    (["perl", "-E", "say 1"], NoScript),
    (["perl", "-lne", "print"], NoScript),
    (["perl", "-l0ne", "print"], NoScript),
    (["perl"], NoScript),
    (["perl", "-"], NoScript),
    (["perl", "-v"], NoScript),
    (["perl", "--version"], NoScript),
    (["perl", "-I"], NoScript),
    (["perl", "-Dtls", "app.pl"], NoScript),  # debugging flags, not parsed
    (["perl", "-Z", "app.pl"], NoScript),
    (["perl", "--frobnicate", "app.pl"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), PERL, ids=ids(PERL))
def test_perl(argv: list[str], expected: object) -> None:
    assert parsed("perl", argv) == expected


# -- bash -----------------------------------------------------------------------------------------------------------

BASH = [
    (["bash", "run.sh"], Script("run.sh")),
    (["bash", "-e", "run.sh"], Script("run.sh")),
    (["bash", "-eux", "run.sh"], Script("run.sh")),
    (["bash", "-o", "pipefail", "run.sh"], Script("run.sh")),  # checked
    (["bash", "+o", "posix", "run.sh"], Script("run.sh")),
    (["bash", "-O", "extglob", "run.sh"], Script("run.sh")),  # checked
    (["bash", "+O", "extglob", "run.sh"], Script("run.sh")),
    (["bash", "-xo", "pipefail", "run.sh"], Script("run.sh")),
    (["bash", "--norc", "--noprofile", "run.sh"], Script("run.sh")),
    (["bash", "--rcfile", "x", "run.sh"], Script("run.sh")),  # checked
    (["bash", "--init-file", "x", "run.sh"], Script("run.sh")),
    (["bash", "--login", "--posix", "run.sh"], Script("run.sh")),
    (["bash", "-i", "run.sh"], Script("run.sh")),  # checked: runs the script
    (["bash", "-l", "run.sh"], Script("run.sh")),
    (["bash", "-", "run.sh"], Script("run.sh")),  # checked
    (["bash", "--", "run.sh"], Script("run.sh")),
    (["bash", "run.sh", "-c", "x"], Script("run.sh")),
    (["bash", "-c", "echo"], NoScript),
    (["bash", "-ec", "echo"], NoScript),
    (["bash", "-x", "-c", "echo", "name"], NoScript),
    (["bash", "-s"], NoScript),
    (["bash", "-s", "arg"], NoScript),
    (["bash"], NoScript),
    (["bash", "-i"], NoScript),
    (["bash", "-"], NoScript),
    (["bash", "-D", "run.sh"], NoScript),  # checked: lists strings, runs nothing
    (["bash", "--version"], NoScript),
    (["bash", "-o"], NoScript),
    (["bash", "-oerrexit", "run.sh"], NoScript),  # checked: -o takes run.sh as an option's name
    (["bash", "--frobnicate", "run.sh"], NoScript),
    (["bash", "-Z", "run.sh"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), BASH, ids=ids(BASH))
def test_bash(argv: list[str], expected: object) -> None:
    assert parsed("bash", argv) == expected


# -- sh: dash, ash ----------------------------------------------------------------------------------------------------

SH = [
    (["sh", "run.sh"], Script("run.sh")),
    (["dash", "-e", "run.sh"], Script("run.sh")),
    (["sh", "-eux", "run.sh"], Script("run.sh")),
    (["sh", "-o", "errexit", "run.sh"], Script("run.sh")),  # checked
    (["sh", "+o", "errexit", "run.sh"], Script("run.sh")),
    (["sh", "-l", "run.sh"], Script("run.sh")),  # checked
    (["sh", "-", "run.sh"], Script("run.sh")),  # checked
    (["sh", "--", "run.sh"], Script("run.sh")),
    (["sh", "-c", "echo"], NoScript),
    (["sh", "-s"], NoScript),
    (["sh"], NoScript),
    (["sh", "-oerrexit", "run.sh"], NoScript),  # checked: dash refuses it
    (["sh", "-O", "extglob", "run.sh"], NoScript),  # bash only
    (["sh", "--norc", "run.sh"], NoScript),  # checked: dash has no long options
    (["sh", "-h", "run.sh"], NoScript),  # checked: dash refuses it
    (["sh", "+l", "run.sh"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), SH, ids=ids(SH))
def test_sh(argv: list[str], expected: object) -> None:
    assert parsed("sh", argv) == expected


# -- java -----------------------------------------------------------------------------------------------------------

JAVA = [
    (["java", "-jar", "app.jar"], Script("app.jar")),
    (["java", "-Xmx1g", "-Dfoo=bar", "-jar", "app.jar", "arg"], Script("app.jar")),
    (["java", "-XX:+UseG1GC", "-Xss512k", "-jar", "app.jar"], Script("app.jar")),
    (["java", "-cp", "lib/*", "-jar", "app.jar"], Script("app.jar")),
    (["java", "--add-modules", "ALL-SYSTEM", "-jar", "app.jar"], Script("app.jar")),
    (["java", "--add-opens", "java.base/java.lang=ALL-UNNAMED", "-jar", "app.jar"], Script("app.jar")),
    (["java", "--add-opens=java.base/java.lang=ALL-UNNAMED", "-jar", "app.jar"], Script("app.jar")),
    (["java", "-javaagent:agent.jar", "-jar", "app.jar"], Script("app.jar")),
    (["java", "-agentlib:jdwp=transport=dt_socket,server=y", "-jar", "app.jar"], Script("app.jar")),
    (["java", "-verbose:gc", "-ea", "-showversion", "-jar", "app.jar"], Script("app.jar")),
    (["java", "--enable-preview", "-jar", "app.jar"], Script("app.jar")),
    (["java", "Hello.java"], Script("Hello.java")),
    (["java", "--source", "17", "hello"], Script("hello")),
    (["java", "--source=17", "hello"], Script("hello")),
    (["java", "-cp", "app.jar", "com.example.Main"], NoScript),  # a main class is not a file
    (["java", "-classpath", "x", "Main"], NoScript),
    (["java", "--class-path", "x", "Main"], NoScript),
    (["java", "--class-path=x", "Main"], NoScript),
    (["java", "-p", "mods", "-m", "app/com.example.Main"], NoScript),
    (["java", "--module-path", "mods", "--module", "app"], NoScript),
    (["java", "@argfile"], NoScript),
    (["java", "-Xmx1g", "@argfile"], NoScript),
    (["java", "-version"], NoScript),
    (["java", "-jar"], NoScript),
    (["java"], NoScript),
    (["java", "-cp"], NoScript),
    (["java", "-frobnicate", "-jar", "app.jar"], NoScript),
    (["java", "-D", "-jar", "app.jar"], NoScript),
]


@pytest.mark.parametrize(("argv", "expected"), JAVA, ids=ids(JAVA))
def test_java(argv: list[str], expected: object) -> None:
    assert parsed("java", argv) == expected


def test_a_reason_never_quotes_more_than_the_option() -> None:
    # Arguments can hold secrets (a token after --password): a reason names at most the unknown option.
    found = entry_point(Invocation("python", "python3", ("--token=s3cr3t", "x")))

    assert isinstance(found, NoScript)
    assert "--token" in found.reason
    assert "s3cr3t" not in found.reason
