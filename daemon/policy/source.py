"""Where in a policy file a problem is: split the text into policies and point at the token at fault.

Cedar (through cedarpy) reports what is wrong but not where: "unexpected token `}`", "attribute
`tierr` on entity type `Workload` not found" with no offset, and for validation only the id it gave
the policy (`policy3`: the fourth in the text). An operator needs the line. So:
- the text is split into policies the way Cedar reads it (each ends at a `;` outside strings and
  `//` comments), so `policyN` is the N+1-th statement;
- a syntax error is pinned by parsing ever longer prefixes of the failing statement, each closed by
  a `;`: a prefix that is only *unfinished* fails on that `;`, one that holds the bad token fails
  otherwise (an LR parser stops at the first token that cannot continue the text), so a binary
  search finds the first token at fault;
- errors found after parsing (an unknown function, an attribute the schema lacks) are pinned by the
  name the message quotes, searched among the statement's tokens; failing that, by the statement.

Nothing here imports cedarpy: the parser is passed in.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PolicySource", "Statement", "Token"]

# A parse function: None when the text parses, else Cedar's message.
Parse = Callable[[str], str | None]

# A prefix of a statement, closed by " ;", fails with this when it is only unfinished: the parser
# stops at the first token that cannot continue the text, so any other error lies in the prefix.
# (Cedar recovers from an error at the next `;`, so a prefix *not* closed would report only the end
# of the input, hiding the error.)
_UNEXPECTED_END = "unexpected token `;`"
_PARSER_ERRORS = ("unexpected token", "invalid token")
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>//[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*(?:"|\Z))
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<number>[0-9]+)
    | (?P<op>==|!=|<=|>=|&&|\|\||::)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_QUOTED = re.compile(r"`([^`]+)`")
_TRAILING_NAME = re.compile(r": (\S+)$")


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Statement:
    """One policy of the file: its tokens, from the first (an annotation or the effect) to its `;`."""

    index: int
    tokens: tuple[Token, ...]

    @property
    def start(self) -> int:
        return self.tokens[0].start

    @property
    def end(self) -> int:
        return self.tokens[-1].end


class PolicySource:
    """One policy file: its name as the operator wrote it, its text, and its statements."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self._line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self.statements = _split(text)

    def position(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a character offset."""
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def statement_text(self, statement: Statement) -> str:
        return self.text[statement.start:statement.end]

    def locate_syntax_error(self, parse: Parse) -> tuple[int, str] | None:
        """The offset of the first syntax error and Cedar's message for it; None when every statement
        parses on its own (then the text as a whole parses too)."""
        for statement in self.statements:
            message = parse(self.statement_text(statement))
            if message is not None:
                return self._syntax_offset(statement, message, parse), message
        return None

    def locate_in_statement(self, index: int, message: str) -> int:
        """The offset of what `message` (about the index-th statement) quotes, else of the statement."""
        if not 0 <= index < len(self.statements):
            return 0
        statement = self.statements[index]
        hinted = self._hinted_offset(statement, message, skip=f"policy{index}")
        return statement.start if hinted is None else hinted

    def _syntax_offset(self, statement: Statement, message: str, parse: Parse) -> int:
        tokens = statement.tokens
        terminated = tokens[-1].text == ";"

        def holds_error(count: int) -> bool:
            if terminated and count == len(tokens):
                return True                           # the statement itself: known to fail
            error = parse(self.text[statement.start:tokens[count - 1].end] + " ;")
            # a complete prefix may fail after parsing (`when { foo(1) }`): that is not located yet
            return error is not None and error.startswith(_PARSER_ERRORS) and not error.startswith(_UNEXPECTED_END)

        if not terminated and not holds_error(len(tokens)):
            return tokens[-1].end                     # all it lacks is its `;`
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if holds_error(middle):
                high = middle
            else:
                low = middle + 1
        if low < len(tokens) or not terminated or message.startswith(_PARSER_ERRORS):
            return tokens[low - 1].start
        # Only the complete statement fails: an error found after parsing. Point at what it names.
        hinted = self._hinted_offset(statement, message, skip=None)
        return statement.start if hinted is None else hinted

    def _hinted_offset(self, statement: Statement, message: str, *, skip: str | None) -> int | None:
        names = _QUOTED.findall(message)
        trailing = _TRAILING_NAME.search(message)
        if trailing is not None:
            names.append(trailing.group(1))
        for name in names:
            if name == skip:
                continue
            for token in statement.tokens:
                if token.text == name:
                    return token.start
            offset = self.text.find(name, statement.start, statement.end)
            while offset != -1:
                if any(t.start <= offset < t.end for t in statement.tokens):  # not inside a comment
                    return offset
                offset = self.text.find(name, offset + 1, statement.end)
        return None


def _split(text: str) -> list[Statement]:
    statements: list[Statement] = []
    current: list[Token] = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind in ("space", "comment"):
            continue
        current.append(Token(match.group(), match.start(), match.end()))
        if match.group() == ";":
            statements.append(Statement(len(statements), tuple(current)))
            current = []
    if current:                                       # text after the last `;`: an unfinished statement
        statements.append(Statement(len(statements), tuple(current)))
    return statements
