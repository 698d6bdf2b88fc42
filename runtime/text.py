"""Text from outside: shown on one line of a terminal or a log (a model's metadata, a request's path), read as
JSON (a run record, a state file, an evaluation), or read as a number (an option, a parameter, a metadata value)."""

from __future__ import annotations

import json
import re
import unicodedata

# an integer in ASCII digits (int() also takes "6_4" and "٦٤"), space around it allowed; groups: the sign, the digits
INTEGER_TEXT = re.compile(r"\s*([+-]?)([0-9]+)\s*")

# escaped: control characters, invisible format characters (bidirectional overrides, zero-width ones), the line
# and paragraph separators (U+2028, U+2029: line ends to str.splitlines and many log readers), lone surrogates
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str) -> str:
    """``text`` with its control, format and line-separator characters escaped (``\\n`` for a newline,
    ``\\u202e`` for a right-to-left override), so that it cannot write a line of its own, move a terminal's
    cursor, or show itself in another order than it is."""
    if text.isprintable():  # the usual case, checked in C
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in _ESCAPED_CATEGORIES else char
        for char in text
    )


def counted(count: int, noun: str) -> str:
    """``count`` of ``noun``, as in "1 file" and "1,200 files"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and its whole length: what a refusal or a log line quotes of a
    value from outside, so that none writes more than a bounded line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def read_json(data: str | bytes) -> object:
    """``data`` parsed as JSON; ``ValueError`` for anything that is not, text nested too deep for the parser among
    it (``json.loads`` raises ``RecursionError`` there, which no caller expects of a damaged file)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep to read") from None
