"""The generate endpoint's OpenAPI description, typed and bounded for client generators (its parameters are
read from the query string by hand, so that every refusal carries the runtime's words)."""

from __future__ import annotations

from digitgen.runtime.noise import MAX_SEED, MIN_TRUNCATION
from digitgen.serve.params import MEDIA_TYPES

ERROR_BODY = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "What was wrong, in the CLI's words"}},
    "required": ["error"],
}
JSON_DIGITS = {
    "type": "object",
    "properties": {
        "labels": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "images": {
            "type": "array",
            "items": {"type": "string", "contentEncoding": "base64", "description": "One digit's PNG file"},
        },
    },
    "required": ["labels", "images"],
}


def _parameter(name: str, schema: dict, description: str, where: str = "query") -> dict:
    return {"name": name, "in": where, "required": False, "schema": schema, "description": description}


# what the server reads as a list of classes, in whitespace that Python's and ECMA-262's regular expressions (a
# client's) agree on: stricter than the server, which also takes Unicode's spaces around a number
_SPACE = r"[ \t\n\v\f\r]*"
DIGITS_PATTERN = rf"^{_SPACE}[+-]?[0-9]+{_SPACE}(,{_SPACE}[+-]?[0-9]+{_SPACE})*$"


def error_response(description: str) -> dict:
    """An OpenAPI response of the JSON error body every refusal carries."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_BODY}}}


def generate_doc(max_count: int, num_classes: int) -> dict:
    """The operation's parameters and responses for a server of ``max_count`` digits a request and a model of
    ``num_classes`` classes."""
    last = num_classes - 1
    binary = {"type": "string", "format": "binary"}
    return {
        "parameters": [
            _parameter(
                "count", {"type": "integer", "minimum": 1, "maximum": max_count, "default": 1}, "How many digits."
            ),
            _parameter(
                "digits",
                {"type": "string", "pattern": DIGITS_PATTERN, "example": "0,3,7"},
                f"Classes 0-{last} to generate, comma-separated, repeated to count (default: 0-{last} in turn).",
            ),
            _parameter(
                "digit", {"type": "integer", "minimum": 0, "maximum": last}, "Only this digit (not with digits)."
            ),
            _parameter("seed", {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "default": 0}, "Noise seed."),
            _parameter(
                "truncation",
                {"type": "number", "minimum": MIN_TRUNCATION},
                "Redraw noise components beyond +-T: cleaner, less varied digits (default: none).",
            ),
            _parameter(
                "format",
                {"type": "string", "enum": list(MEDIA_TYPES)},
                "png (one digit), grid (contact sheet), npz, idx (tar of the MNIST IDX pair) or json (labels and "
                "base64 PNGs). Without it, the Accept header chooses among the response's media types; one digit "
                "defaults to png, more to grid.",
            ),
            # no Accept parameter: OpenAPI ignores one of that name (its responses' media types say what it takes)
            _parameter(
                "If-None-Match", {"type": "string"}, "An ETag held: 304 if it still names the answer.", "header"
            ),
            _parameter("If-Match", {"type": "string"}, "ETags: 412 unless one names the answer.", "header"),
            _parameter("X-Request-ID", {"type": "string"}, "Echoed (a token of up to 128 characters).", "header"),
        ],
        "responses": {
            "200": {
                "description": "The digits, byte for byte what `digitgen generate` writes",
                "headers": {
                    "ETag": {"schema": {"type": "string"}, "description": "Strong: the model and the parameters"},
                    "Cache-Control": {"schema": {"type": "string"}, "description": "public, immutable"},
                },
                "content": {
                    media: {"schema": JSON_DIGITS if media == "application/json" else binary}
                    for media in sorted(set(MEDIA_TYPES.values()))
                },
            },
            "304": {"description": "Not modified (If-None-Match names the ETag)"},
            "406": error_response("Accept names no type this request can send"),
            "412": error_response("If-Match names no ETag of the answer"),
            "422": error_response("A bad parameter"),
            "500": error_response("An internal error; the server log has the details under the request id"),
            "503": error_response("Busy or past the time limit; retry after Retry-After seconds"),
        },
    }
