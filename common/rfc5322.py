"""RFC 5322 3.2 lexical pieces that header parsers in more than one tier read: comments and
quoted strings. Pure functions on str."""

from __future__ import annotations


def read_comment(value: str, i: int) -> tuple[int, str]:
    """The comment that starts at `value[i]` ("("): (the index after it, its text without
    the outer parentheses, quoted-pairs unescaped). Nested comments are part of the text; an
    unclosed one runs to the end."""
    depth = 0
    text: list[str] = []
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            text.append(value[i + 1])
            i += 2
            continue
        if ch == "(":
            depth += 1
            if depth > 1:
                text.append(ch)
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1, "".join(text)
            text.append(ch)
        else:
            text.append(ch)
        i += 1
    return i, "".join(text)


def read_quoted(value: str, i: int) -> tuple[int, str]:
    """The quoted string that starts at `value[i]` ('"'): (the index after it, its content,
    quoted-pairs unescaped). An unclosed one runs to the end."""
    text: list[str] = []
    i += 1
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            text.append(value[i + 1])
            i += 2
            continue
        if ch == '"':
            return i + 1, "".join(text)
        text.append(ch)
        i += 1
    return i, "".join(text)
