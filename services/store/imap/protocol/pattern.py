"""LIST and LSUB patterns (RFC 3501 6.3.8): `*` matches any text, `%` any text without the
hierarchy delimiter, every other character itself.

Matched in time linear in the name whatever the pattern: a pattern comes from the client, and
a backtracking matcher (a regular expression) takes exponential time on one such as
`%*%*%*...x` against a name without `x`, which held the whole store's event loop.

The pattern is a small automaton, one state per pattern position, and the states reached so
far are the bits of an int (the shift-and method): each character of the name moves every
state at once with a few integer operations.
"""

from __future__ import annotations

from collections import defaultdict

ANY = "*"
LOCAL = "%"


class ListPattern:
    def __init__(self, pattern: str, delimiter: str) -> None:
        tokens = _collapsed(pattern)
        self._everything = tokens == [ANY]
        self._delimiter = delimiter
        self._accept = 1 << len(tokens)
        self._any = _positions(tokens, ANY)
        self._wild = self._any | _positions(tokens, LOCAL)
        literal: defaultdict[str, int] = defaultdict(int)
        for position, token in enumerate(tokens):
            if token not in (ANY, LOCAL):
                literal[token] |= 1 << position
        self._literal = dict(literal)
        self._min_length = len(tokens) - bin(self._wild).count("1")

    def matches(self, name: str, caseless: int = 0) -> bool:
        """Whether `name` matches; its first `caseless` characters match letters of either
        case (INBOX, RFC 3501 5.1)."""
        if self._everything:
            return True
        if len(name) < self._min_length:
            return False  # every literal of the pattern takes one character
        reached = self._with_empty_wildcards(1)
        for index, char in enumerate(name):
            literal = self._literal.get(char, 0)
            if index < caseless:
                literal |= self._literal.get(char.swapcase(), 0)
            stay = reached & (self._any if char == self._delimiter else self._wild)
            reached = self._with_empty_wildcards(stay | (reached & literal) << 1)
            if not reached:
                return False
        return bool(reached & self._accept)

    def _with_empty_wildcards(self, reached: int) -> int:
        # A wildcard also matches no text; one step suffices: wildcards never follow each
        # other in the collapsed pattern.
        return reached | (reached & self._wild) << 1


def _collapsed(pattern: str) -> list[str]:
    """The pattern's characters with each run of wildcards made one: `*` when the run holds
    one (it matches what the run matches), else `%`."""
    tokens: list[str] = []
    for char in pattern:
        if char in (ANY, LOCAL) and tokens and tokens[-1] in (ANY, LOCAL):
            if char == ANY:
                tokens[-1] = ANY
            continue
        tokens.append(char)
    return tokens


def _positions(tokens: list[str], wanted: str) -> int:
    bits = 0
    for position, token in enumerate(tokens):
        if token == wanted:
            bits |= 1 << position
    return bits
