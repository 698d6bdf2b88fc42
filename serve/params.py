"""The generate endpoint's request: query parameters and ``Accept`` parsed into one normalised request,
with the runtime's own checks and words, and the strong ETag that names its response."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.generator import DigitGenerator, parse_digit_list
from digitgen.runtime.layout import check_grid_count
from digitgen.runtime.noise import NOISE_SCHEME
from digitgen.runtime.text import INTEGER_TEXT, LONGEST_NUMBER, cut, integer_digits, read_integer, read_number

MEDIA_TYPES = {
    "png": "image/png",
    "grid": "image/png",
    "npz": "application/x-npz",
    "idx": "application/x-tar",
    "json": "application/json",
}
PARAMETERS = ("digits", "digit", "count", "seed", "truncation", "format")
MAX_VALUE_LENGTH = 1024  # characters of one parameter's value: a list of 512 digits; a refusal never echoes more
ENCODING_VERSION = "2"  # bump when the bytes of any format change
# RFC 9110, 12.4.2, with any number of decimals, and ".2" for 0.2 (what Java's HttpURLConnection sends)
_QVALUE = re.compile(r"0(\.[0-9]*)?|\.[0-9]+|1(\.0*)?")


class NotAcceptableError(InvalidRequestError):
    """The ``Accept`` header names no type this endpoint sends."""


def shortest_cycle(digits: tuple[int, ...], count: int) -> tuple[int, ...]:
    """A cycle of classes that labels ``count`` digits as ``digits`` does: the shortest where ``digits`` covers the
    count (1,2,1 for three digits is 1,2), else the shortest that repeats whole in it (1,2,1,2 is 1,2)."""
    used = digits[:count]  # a longer cycle's classes past the count label nothing

    def labels_alike(period: int) -> bool:  # used once (1,2,1 is 1,2 for three digits), or repeated whole
        if count > len(used) and len(used) % period:
            return False
        return all(used[i] == used[i % period] for i in range(period, len(used)))

    return used[: next(period for period in range(1, len(used) + 1) if labels_alike(period))]


@dataclass(frozen=True)
class DigitsRequest:
    """A checked generate request: ``digits`` is the full cycle of classes, ``fmt`` the chosen format."""

    digits: tuple[int, ...]
    count: int
    seed: int
    truncation: float | None
    fmt: str

    def key(self) -> str:
        """The normalised parameters, one string: requests for the same digits give equal keys (the digits as the
        shortest cycle that labels them: ``digits=7,7`` and ``digits=7,3&count=1`` are ``digit=7``)."""
        digits = ",".join(map(str, shortest_cycle(self.digits, self.count)))
        return f"digits={digits}&count={self.count}&seed={self.seed}&truncation={self.truncation!r}&format={self.fmt}"


def _check_limit(count: int | str, max_count: int) -> None:
    """Refuse a count (as :func:`~digitgen.runtime.text.read_integer` read it) over ``max_count``, however
    many digits it is written with, before any other check."""
    if isinstance(count, int):
        shown = count if count > max_count else None
    else:  # a positive integer too long to read is over any limit; anything else is for the runtime to refuse
        match = INTEGER_TEXT.fullmatch(count)
        digits = integer_digits(match) if match is not None and match[1] != "-" else ""
        shown = f"{digits[:20]}... ({len(digits)} digits long)" if len(digits) > LONGEST_NUMBER else None
    if shown is not None:
        raise InvalidRequestError(f"number of digits {shown} is over this server's limit of {max_count} per request")


def _digits(digits: str | None, digit: str | None) -> list[int | str] | None:
    if digits is not None and digit is not None:
        raise InvalidRequestError("give digits or digit, not both")
    if digit is not None:
        return [read_integer(digit)]
    return None if digits is None else parse_digit_list(digits)


def _ranges(accept: str) -> tuple[list[tuple[str, float]], list[str]]:
    """The media ranges of an ``Accept`` header with their q-values, in order, and the ranges left out for a
    q-value that cannot be read. A range with media-type parameters before its q (``image/png;level=1``) names
    only a type with those parameters (RFC 9110, 12.5.1), which no response here has: it matches nothing. A
    ``charset`` is the exception: every body here is binary or ASCII JSON, which reads the same in any charset
    a client names (``application/json; charset=utf-8``, which many clients send)."""
    ranges, unread = [], []
    for item in accept.split(","):
        media, *options = (part.strip() for part in item.split(";"))
        names = [option.partition("=")[0].strip().lower() for option in options]
        q_at = names.index("q") if "q" in names else len(names)
        qvalues = [option.partition("=")[2].strip() for option, name in zip(options, names, strict=True) if name == "q"]
        if not all(_QVALUE.fullmatch(q) for q in qvalues):
            unread.append(item.strip())
        elif media and set(names[:q_at]) <= {"charset"}:  # no parameter before q but a charset
            ranges.append((media.lower(), float(qvalues[-1]) if qvalues else 1.0))
    return ranges, unread


def _specificity(media_range: str, media_type: str) -> int:
    """How closely ``media_range`` names ``media_type``: 3 exactly, 2 as ``type/*``, 1 as ``*/*`` (or a bare
    ``*``, which some clients send), 0 not at all."""
    if media_range == media_type:
        return 3
    if media_range in ("*/*", "*"):
        return 1
    kind, _, sub = media_range.partition("/")
    return 2 if sub == "*" and kind == media_type.partition("/")[0] else 0


def _preference(ranges: list[tuple[str, float]], media_type: str) -> tuple[float, int, int]:
    """The q-value the most specific matching range gives ``media_type`` (RFC 9110, 12.5.1: ``image/png;q=0,
    */*`` refuses PNG), that range's specificity and its position; q 0 where none matches."""
    best = (0.0, 0, len(ranges))
    for position, (media_range, quality) in enumerate(ranges):
        specificity = _specificity(media_range, media_type)
        if specificity > best[1]:
            best = (quality, specificity, position)
    return best


def choose_format(fmt: str | None, accept: str | None, count: int) -> str:
    """The format asked by ``format=``, else by ``Accept``: the highest q-value, then among equals a type named
    exactly over one a range names (``*/*, image/png`` is PNG), then the range listed first, then the default
    (one digit png, more grid)."""
    default = "png" if count == 1 else "grid"
    if fmt is not None and fmt not in MEDIA_TYPES:
        raise InvalidRequestError(f"unknown format {fmt!r}; choose one of {', '.join(MEDIA_TYPES)}")
    if not accept or accept.strip() in ("", "*/*", "*"):  # no header, or curl's and httpx's: any type
        return fmt or default
    candidates = [fmt] if fmt is not None else [default, *(f for f in MEDIA_TYPES if f not in ("png", "grid"))]
    ranges, unread = _ranges(accept)
    ranked = []
    for order, candidate in enumerate(candidates):
        quality, specificity, position = _preference(ranges, MEDIA_TYPES[candidate])
        if quality > 0:
            ranked.append((-quality, -specificity, position, order, candidate))
    if ranked:
        return min(ranked)[-1]
    offered = ", ".join(sorted({MEDIA_TYPES[c] for c in candidates}))
    unreadable = cut("; ".join(map(repr, unread)), MAX_VALUE_LENGTH)
    left_out = f" (left out, their q-value unreadable: {unreadable})" if unread else ""
    shown = cut(repr(accept), MAX_VALUE_LENGTH)
    raise NotAcceptableError(f"cannot answer Accept: {shown}{left_out}; this request can send {offered}")


def parse_request(
    query: Sequence[tuple[str, str]], accept: str | None, generator: DigitGenerator, max_count: int
) -> DigitsRequest:
    """Check the query string's parameters with the runtime's own checks and pick the format."""
    given: dict[str, str] = {}
    for name, value in query:
        if name not in PARAMETERS:
            shown = cut(repr(name), MAX_VALUE_LENGTH)
            raise InvalidRequestError(f"unknown parameter {shown}; parameters: {', '.join(PARAMETERS)}")
        if name in given:
            raise InvalidRequestError(f"give {name} once")
        if len(value) > MAX_VALUE_LENGTH:
            raise InvalidRequestError(
                f"{name} is {len(value):,} characters long; this server reads at most {MAX_VALUE_LENGTH:,}"
            )
        given[name] = value
    num, seed = read_integer(given.get("count", "1")), read_integer(given.get("seed", "0"))
    _check_limit(num, max_count)
    digits, truncation = _digits(given.get("digits"), given.get("digit")), read_number(given.get("truncation"))
    checked = generator.check_request(num, digits, seed, truncation=truncation)  # type: ignore[arg-type]
    count = checked.num
    fmt = choose_format(given.get("format"), accept, count)
    if fmt == "png" and count != 1:
        raise InvalidRequestError(f"format png holds one digit, not {count}; ask for grid, npz, idx or json")
    if fmt == "grid":
        check_grid_count(count, "npz, idx or json")
    return DigitsRequest(checked.digits, count, checked.seed, checked.truncation, fmt)


def etag(source: str, request: DigitsRequest) -> str:
    """A strong ETag: the response is a pure function of its ``source`` (the model's sha256 and
    :func:`~digitgen.runtime.encode.encoder_versions`), the noise scheme, the encodings and the normalised request."""
    text = f"{source}|{NOISE_SCHEME}|{ENCODING_VERSION}|{request.key()}"
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def precondition_failed(if_match: str | None, tag: str) -> bool:
    """Whether ``If-Match`` is given and names neither ``tag`` (strong comparison: a weak tag never matches, RFC
    9110, 13.1.1) nor ``*``."""
    if if_match is None:
        return False
    tags = [t.strip() for t in if_match.split(",")]
    return "*" not in tags and tag not in tags


def not_modified(if_none_match: str | None, tag: str) -> bool:
    """Whether ``If-None-Match`` names ``tag`` (weak comparison, as RFC 9110 asks) or is ``*``."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or tag in (t.removeprefix("W/") for t in tags)  # W/* is no tag
