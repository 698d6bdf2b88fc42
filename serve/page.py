"""The built browser page, served at ``/`` beside the API, its refusals in JSON as the API's are."""

from __future__ import annotations

import errno
import logging
import os
import stat
from urllib.parse import quote

from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response

from digitgen.serve.observe import Message, Receive, Scope, Send, header
from digitgen.serve.params import precondition_failed
from digitgen.serve.refusal import refusal

RANGE_REFUSALS = (400, 416)  # what Starlette answers a Range header it cannot serve, in plain text or no body


def _range_refusal(status: int, plain_text: str, headers: dict[str, str]) -> str:
    """What was wrong with a ``Range`` header, from the plain-text answer Starlette's files give it."""
    if status == 416:  # Content-Range: bytes */SIZE
        size = headers["content-range"].rpartition("/")[2]
        return f"the Range asked for covers no byte of the file ({size} bytes); ask for bytes in it, or leave Range out"
    reason = plain_text.removeprefix("Range header: ").rstrip(".")
    return f"cannot serve this Range header ({reason}); send bytes=START-END, or leave Range out"


def _is_hidden(path: str) -> bool:
    """Whether a path in the folder names a dotfile or goes through a dot-folder (``.env``, ``.git/config``)."""
    return any(part.startswith(".") and part not in (".", "..") for part in path.split(os.sep))


def _without_other_range_units(scope: Scope) -> Scope:
    """``scope`` without a ``Range`` header in a unit other than bytes (``items=0-1``), which a server must ignore
    (RFC 9110, 14.2) and Starlette would refuse."""
    headers = scope.get("headers", [])
    other_unit = [
        (name, value)
        for name, value in headers
        if name.lower() == b"range" and b"=" in value and value.partition(b"=")[0].strip().lower() != b"bytes"
    ]
    return {**scope, "headers": [h for h in headers if h not in other_unit]} if other_unit else scope


class PageFiles(StaticFiles):
    """Starlette's static files, whose refusals of a ``Range`` header (a 400 or a 416, one short message) are JSON
    here; an ``If-Match`` that names no ETag of a file is refused with a 412 in JSON (Starlette ignores it); any
    other answer, a 404 page of the folder's own among them, goes as it is. A dotfile, or a file in a dot-folder
    (``.env``, ``.git/``), is not served: it is answered as a missing file is, as is a file the server cannot read
    (its permissions, a loop of links), which the log names. A folder named without its
    final slash is redirected by a relative reference (its query kept), never to an address built from the request's
    ``Host``."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if _is_hidden(path):
            return "", None
        try:
            full_path, stat_result = super().lookup_path(path)
            if stat_result is not None and stat.S_ISREG(stat_result.st_mode):
                with open(full_path, "rb"):  # opened now, not once its 200 and length have gone
                    pass
        except OSError as exc:  # not the client's fault: said in the log; the client gets the answer for a missing file
            if exc.errno != errno.ENAMETOOLONG:
                reason = exc.strerror or type(exc).__name__
                logging.getLogger("digitgen.serve").warning("the page's %s cannot be read (%s)", path, reason)
            return "", None
        return full_path, stat_result

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        tag = response.headers.get("etag")
        if_match = header(scope, b"if-match")
        if response.status_code in (200, 304) and tag is not None and precondition_failed(if_match, tag):
            return refusal(412, f"If-Match names no ETag of this file, which is {tag}")
        if isinstance(response, RedirectResponse):  # ./NAME/: NAME may hold a colon, which would read as a scheme
            last = scope["path"].rpartition("/")[2]
            query = scope.get("query_string", b"").decode("latin-1")
            return RedirectResponse(f"./{quote(last)}/" + (f"?{query}" if query else ""), response.status_code)
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused: Message | None = None
        scope = _without_other_range_units(scope)

        async def send_in_json(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] in RANGE_REFUSALS:
                refused = message  # answered once its body (its reason) has come
            elif refused is None:
                await send(message)
            else:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in refused["headers"]}
                text = _range_refusal(refused["status"], bytes(message["body"]).decode(), headers)
                kept = {k: v for k, v in headers.items() if k not in ("content-type", "content-length")}
                await refusal(refused["status"], text, kept)(scope, receive, send)

        await super().__call__(scope, receive, send_in_json)
