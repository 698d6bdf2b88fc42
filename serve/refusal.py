"""Every refusal the server makes, as the same JSON body: ``{"error": "..."}``."""

from __future__ import annotations

import json

from fastapi import Response


def refusal(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A response of ``status`` whose JSON body names what was wrong; never cached."""
    return Response(
        json.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
