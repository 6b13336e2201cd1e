"""What every interpreter's option parser shares: what a command line runs, and the walk over its arguments.

A parser (commandline.py has python's, argv_grammars.py the others') walks an interpreter's
arguments as that interpreter does and ends in one of three answers: a Script (a file, named as on
the command line), a Module (`python -m`), or NoScript, which is also the answer whenever the
parser cannot be sure. The model lives here, apart from commandline.py, so that the grammars can
use it and commandline.py can dispatch to them without the two importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "OCTAL",
    "Arguments",
    "EntryPoint",
    "Module",
    "NoScript",
    "Script",
    "leading",
    "script_or_stdin",
    "unknown_option",
]


@dataclass(frozen=True, slots=True)
class Script:
    """A file the interpreter runs, named as on its command line: absolute, or relative to its working directory."""

    path: str
    # Names the interpreter also tries, appended, when `path` names no file: node's `node app` runs app.js.
    suffixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Module:
    """`python -m name`: a module python looks for along its search path."""

    name: str
    search_cwd: bool = True  # python puts its working directory first; not with -I or -P
    use_environment: bool = True  # PYTHONPATH and the like count; not with -E or -I
    user_site: bool = True  # ~/.local/lib/pythonX.Y/site-packages counts; not with -s or -I


@dataclass(frozen=True, slots=True)
class NoScript:
    """The command line names no file the interpreter runs, or not one this parser can be sure of."""

    reason: str


EntryPoint = Script | Module | NoScript


class Arguments:
    """The arguments a parser walks through, and how running out of them reads."""

    def __init__(self, arguments: Sequence[str], complete: bool) -> None:
        self.items = arguments
        self.index = 0
        self.complete = complete

    def peek(self) -> str | None:
        return self.items[self.index] if self.index < len(self.items) else None

    def take(self) -> str | None:
        item = self.peek()
        if item is not None:
            self.index += 1
        return item

    def ran_out(self, reason: str) -> NoScript:
        """NoScript for arguments that ended: `reason` if the command line is all there, else that it was cut."""
        if not self.complete:
            return NoScript("its command line is longer than the agent reads")
        return NoScript(reason)

    def missing(self, option: str) -> NoScript:
        return self.ran_out(f"{option} lacks its argument")


def unknown_option(option: str) -> NoScript:
    # Never shown with its value or the rest of the command line: arguments can hold secrets.
    return NoScript(f"option {option.partition('=')[0][:40]!r} is not one this parser knows: "
                    "it might take an argument")


OCTAL = "01234567"  # the digits an octal argument of an option takes


def leading(text: str, characters: str, limit: int | None = None) -> int:
    """How many of the first characters of `text` (at most `limit`) are among `characters`: digits an option takes."""
    count = len(text) - len(text.lstrip(characters))
    return count if limit is None else min(count, limit)


def script_or_stdin(args: Arguments, *, stdin: str = "reads its program from standard input",
                    suffixes: tuple[str, ...] = ()) -> EntryPoint:
    """The script the first argument left names: NoScript for `-` (standard input) or none at all."""
    script = args.take()
    if script is None:
        return args.ran_out(stdin)
    if script == "-":
        return NoScript(stdin)
    return Script(script, suffixes)

