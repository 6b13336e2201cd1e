"""Which interpreter a process is, and what its command line says it runs. Pure parsing: no I/O.

The interpreter is named by the executable the kernel reports (/proc/<pid>/exe), never by argv[0],
which the process chose: `exec -a python3 ./miner` is not a python. A venv's `bin/python` is a
symlink, and the kernel reports what it points to, so a venv's python is named `python` too.

What it runs is read from its command line, which the process wrote itself and may rewrite at any
time (docs/design.md §6): script selectors never stand alone, every entry also needs a
kernel-anchored selector. The parsers follow each interpreter's own option grammar (as its source
parses argv, checked against the installed interpreters where there are some), because the naive
rule "the first argument not starting with a dash" is wrong for most of them: `python -W ignore
app.py` would name `ignore`. An option a parser does not know may take an argument, which would then
be taken for the script; such a command line gives NoScript, never a guess.

This module is the entry to all of that: it tells the interpreter, and holds python's grammar (the
one that can name a module, Module, rather than a file). The other interpreters' grammars are in
argv_grammars.py; what every parser returns (Script, Module, NoScript, re-exported here) and the
argument walk they share are in argv_parsing.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vouchd.attestors.workload.argv_grammars import PARSERS
from vouchd.attestors.workload.argv_parsing import (
    Arguments,
    EntryPoint,
    Module,
    NoScript,
    Script,
    script_or_stdin,
    unknown_option,
)

__all__ = [
    "INTERPRETERS",
    "MODULE_NAME",
    "Invocation",
    "Module",
    "NoScript",
    "Script",
    "entry_point",
    "executable_interpreter",
    "identify",
    "is_busybox",
    "split_command_line",
]

# The values of `interpreter:name`. `sh` is the POSIX shells: dash, ash, busybox sh; bash is itself.
INTERPRETERS = ("bash", "java", "node", "perl", "python", "ruby", "sh")

_BUSYBOX = "busybox"
_DELETED_SUFFIX = " (deleted)"  # the kernel's mark on an executable replaced since exec (a package upgrade)
_EXECUTABLE_NAMES = (
    # python3, python3.11, python3.12d (debug), python3.13t (free-threaded)
    (re.compile(r"python(?:[23](?:\.\d+)?)?[a-z]{0,2}"), "python"),
    (re.compile(r"node|nodejs"), "node"),
    (re.compile(r"ruby(?:\d+(?:\.\d+)*)?"), "ruby"),
    (re.compile(r"perl(?:\d+(?:\.\d+)*)?"), "perl"),
    (re.compile(r"bash"), "bash"),
    (re.compile(r"dash|ash|sh"), "sh"),
    (re.compile(r"java"), "java"),
)
_BUSYBOX_SHELLS = frozenset({"sh", "ash"})

# A dotted module name python can import: identifiers (any script \w allows) joined by dots.
MODULE_NAME = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*")


@dataclass(frozen=True, slots=True)
class Invocation:
    """An interpreter and the arguments it parses: argv[1:], or argv[2:] for `busybox sh`."""

    interpreter: str
    program: str  # argv[0]: how it was called (python finds its venv through it)
    arguments: tuple[str, ...]



def executable_interpreter(executable: str) -> str | None:
    """The interpreter an executable (as /proc/<pid>/exe reads) is by its name, or None: also for busybox,
    which only its argv tells (see identify)."""
    name = os.path.basename(executable.removesuffix(_DELETED_SUFFIX))
    return next((interpreter for pattern, interpreter in _EXECUTABLE_NAMES if pattern.fullmatch(name)), None)


def is_busybox(executable: str) -> bool:
    return os.path.basename(executable.removesuffix(_DELETED_SUFFIX)) == _BUSYBOX


def identify(executable: str, argv: Sequence[str]) -> Invocation | None:
    """The interpreter `executable` (as /proc/<pid>/exe reads) is, with its arguments; None if it is none.

    busybox is the one exception to "never argv[0]": one binary is every applet, and it picks the
    applet by argv[0] (or argv[1] after `busybox`), so its argv is all there is to tell its shell from
    its `sleep`. Only its shells count.
    """
    program = argv[0] if argv else ""
    if is_busybox(executable):
        applet = os.path.basename(program)
        arguments = tuple(argv[1:])
        if applet == _BUSYBOX and arguments:
            applet, arguments = arguments[0], arguments[1:]
        return Invocation("sh", program, arguments) if applet in _BUSYBOX_SHELLS else None
    interpreter = executable_interpreter(executable)
    return Invocation(interpreter, program, tuple(argv[1:])) if interpreter is not None else None


def split_command_line(raw: bytes, *, truncated: bool = False) -> tuple[str, ...]:
    """The arguments in the content of /proc/<pid>/cmdline: NUL-separated, each NUL-terminated.

    Bytes that are not UTF-8 are kept as surrogate escapes (os.fsdecode), so that a path on the
    command line opens the very file it names. `truncated`: the content is the first part only, so
    its last argument may be cut short and is dropped.
    """
    parts = raw.split(b"\0")
    if truncated or parts[-1] == b"":
        # The last piece is either the empty one after the final NUL or possibly a cut-off argument.
        parts.pop()
    return tuple(os.fsdecode(part) for part in parts)


def entry_point(invocation: Invocation, *, complete: bool = True) -> EntryPoint:
    """What `invocation` runs, by its interpreter's option grammar.

    `complete=False`: the arguments are only the start of the command line (it was longer than the
    agent reads); a parser that runs out of them then says so rather than guessing.
    """
    parse = _PARSERS[invocation.interpreter]
    found = parse(Arguments(invocation.arguments, complete))
    if isinstance(found, Script) and not found.path:
        return NoScript("names an empty script")
    return found


# -- python: Python/getopt.c and Modules/main.c -------------------------------------------------------------------

_PYTHON_FLAGS = frozenset("bBdEiIOPqRsStuvx")
_PYTHON_EXITS = frozenset("hV?")
_PYTHON_WITH_ARGUMENT = frozenset("WX")
_PYTHON_LONG_WITH_ARGUMENT = frozenset({"--check-hash-based-pycs"})  # never `--name=value`: that is an error
_PYTHON_LONG_EXITS = frozenset({"--help", "--version", "--help-env", "--help-xoptions", "--help-all"})


def _python(args: Arguments) -> EntryPoint:
    isolated = safe_path = ignore_environment = no_user_site = False
    while (arg := args.peek()) is not None:
        if arg == "--":
            args.take()
            break
        if arg == "-" or not arg.startswith("-"):
            break
        args.take()
        if arg.startswith("--"):
            if arg in _PYTHON_LONG_EXITS:
                return NoScript(f"{arg} prints and exits")
            if arg not in _PYTHON_LONG_WITH_ARGUMENT:
                return unknown_option(arg)
            if args.take() is None:
                return args.missing(arg)
            continue
        # Short options combine (`-uBc code`); one that takes an argument takes the rest of the word
        # (`-Wignore`, `-mpkg.mod`) or else the next word, whatever it looks like.
        for position, letter in enumerate(arg[1:], start=2):
            rest = arg[position:]
            if letter == "c":
                return NoScript("runs the code given with -c")
            if letter == "m":
                name = rest or args.take()
                if name is None:
                    return args.missing("-m")
                if not MODULE_NAME.fullmatch(name):
                    return NoScript("-m names no module python could import by a dotted name")
                return Module(
                    name,
                    search_cwd=not (isolated or safe_path),
                    use_environment=not (isolated or ignore_environment),
                    user_site=not (isolated or no_user_site),
                )
            if letter in _PYTHON_WITH_ARGUMENT:
                if not rest and args.take() is None:
                    return args.missing(f"-{letter}")
                break
            if letter in _PYTHON_EXITS:
                return NoScript(f"-{letter} prints and exits")
            if letter not in _PYTHON_FLAGS:
                return unknown_option(f"-{letter}")
            isolated |= letter == "I"
            safe_path |= letter == "P"
            ignore_environment |= letter == "E"
            no_user_site |= letter == "s"
    return script_or_stdin(args)


_PARSERS: dict[str, Callable[[Arguments], EntryPoint]] = {"python": _python, **PARSERS}
