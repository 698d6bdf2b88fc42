"""The generate endpoint's OpenAPI description (its parameters are read from the query string by hand,
so that every refusal carries the runtime's words)."""

from __future__ import annotations

from digitgen.serve.params import MEDIA_TYPES


def _parameter(name: str, description: str, example: str) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
        "example": example,
    }


GENERATE_DOC = {
    "parameters": [
        _parameter("count", "How many digits, 1 to the server's --max-count (default 1).", "10"),
        _parameter("digits", "Classes to generate, repeated to count (default: 0-9 in turn).", "0,3,7"),
        _parameter("digit", "Generate only this digit (instead of digits).", "7"),
        _parameter("seed", "Noise seed, 0 to 2^64 - 1 (default 0).", "0"),
        _parameter("truncation", "Redraw noise components beyond +-T (default: none).", "1.5"),
        _parameter(
            "format",
            "png (one digit), grid (contact sheet), npz, idx (tar of the MNIST IDX pair) or json (labels and "
            "base64 PNGs). Without it, Accept chooses; one digit defaults to png, more to grid.",
            "grid",
        ),
    ],
    "responses": {
        "200": {
            "description": "The digits, byte for byte what `digitgen generate` writes",
            "content": {media: {} for media in sorted(set(MEDIA_TYPES.values()))},
        },
        "304": {"description": "Not modified (If-None-Match names the ETag)"},
        "406": {"description": "Accept names no type this request can send"},
        "422": {"description": 'A bad parameter: {"error": "..."}'},
        "503": {"description": "Busy or past the time limit; retry after Retry-After seconds"},
    },
}
