"""Text from outside (a model's metadata, a request's path) shown on one line of a terminal or a log."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n`` for a newline), so that it cannot write a line of
    its own, or move a terminal's cursor."""
    return _CONTROL.sub(lambda control: control.group().encode("unicode_escape").decode("ascii"), text)
