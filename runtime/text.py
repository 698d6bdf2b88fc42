"""Text from outside: shown on one line of a terminal or a log (a model's metadata, a request's path), read as
JSON (a run record, a state file, an evaluation), or read as a number (an option, a parameter, a metadata value)."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import TypeGuard

# an integer in ASCII digits (int() also takes "6_4" and "٦٤"), space around it allowed; groups: the sign, the digits
INTEGER_TEXT = re.compile(r"\s*([+-]?)([0-9]+)\s*")

# Numbers as the CLI and the server read them: what int() and float() read, less underscores, digits other than
# 0-9, nan, infinity and exponents past 3 digits. No two parts of a pattern can match the same characters, so a
# refused value takes time linear in its length.
DECIMAL_TEXT = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?\s*")
LONGEST_NUMBER = 40  # significant digits read as a number: every valid value has at most 20, and int() stops at 4,300


def read_integer(text: str) -> int | str:
    """``text`` as an int when it is one (of at most :data:`LONGEST_NUMBER` significant digits), else ``text``
    itself, for the runtime's check to refuse by name (so the CLI and the server refuse in the same words)."""
    if len(text) <= LONGEST_NUMBER and text.isascii() and text.isdigit():  # the usual form, read without a regex
        return int(text)
    match = INTEGER_TEXT.fullmatch(text)
    if match is None or len(integer_digits(match)) > LONGEST_NUMBER:
        return text
    return int(match[1] + integer_digits(match))


def integer_digits(match: re.Match[str]) -> str:
    """The digits of an :data:`INTEGER_TEXT` match without leading zeros."""
    return match[2].lstrip("0") or "0"


def finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value``, read from a file (JSON, a checkpoint), is an int or a float, not a bool, that a float holds
    as a finite number: JSON and pickle keep ints of any size, on which ``math.isfinite`` raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # 10**400
        return False


def read_number(text: str | None) -> float | str | None:
    """``text`` as a float when it is a decimal number, else ``text`` itself for the runtime's check to refuse
    by name (Python's float() takes "1_0", " 2", "nan" and "infinity" too). The space around it is what ``\\s``
    matches, str.isspace()'s, of which float() leaves U+001C-U+001F in place: it is stripped first."""
    return float(text.strip()) if text is not None and DECIMAL_TEXT.fullmatch(text) else text


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


MAX_QUOTED = 1024  # characters of a value a refusal quotes, as the page's module and the HTTP server quote


def whole(value: int, separated: bool = False) -> str:
    """``str(value)`` (``separated``: in groups of three, "1,200"), or its length in digits for an integer too long
    for Python to write out (past 4,300 digits by default, ``str()`` raises ``ValueError``)."""
    try:
        return f"{value:,}" if separated else str(value)
    except ValueError:
        digits = math.floor((abs(value).bit_length() - 1) * math.log10(2)) + 1  # 2**(n-1) <= |value| < 2**n
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits:,} digits"


def quoted(value: object) -> str:
    """``repr(value)`` as a refusal quotes it: at most :data:`MAX_QUOTED` characters, then the value's own length,
    in the words of the page's module (a value pasted by mistake, a megabyte of it, stays one short line)."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = whole(value)
    else:
        try:
            text = repr(value)
        except ValueError:  # a number built of integers too long to write out, a Fraction of them, say
            text = f"a {type(value).__name__} too long to write out"
    if len(text) <= MAX_QUOTED:
        return text
    length = len(value) if isinstance(value, str) else len(text)
    return f"{text[:MAX_QUOTED]}... ({length:,} characters)"


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
