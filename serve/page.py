"""The built browser page, served at ``/`` beside the API, its refusals in JSON as the API's are."""

from __future__ import annotations

import errno
import logging
import os
import stat
from datetime import datetime
from urllib.parse import quote

from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import NotModifiedResponse

from digitgen.serve.observe import LOGGED_TARGET, Message, Receive, Scope, Send, bounded, header
from digitgen.serve.params import not_modified, precondition_failed
from digitgen.serve.refusal import refusal

RANGE_REFUSALS = (400, 416)  # what Starlette answers a Range header it cannot serve, in plain text or no body
# an HTTP-date (RFC 9110, 5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms a recipient must accept
HTTP_DATE_FORMATS = ("%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %d %H:%M:%S %Y")


def http_date(value: str | None) -> datetime | None:
    """``value`` as a time (in UTC) if it is one valid HTTP-date, else None: a header whose date is not valid, or which
    lists several, is ignored (RFC 9110, 13.1.3 and 13.1.4), never read as a date it does not name."""
    for form in HTTP_DATE_FORMATS:
        try:
            return datetime.strptime((value or "").strip(), form)
        except ValueError:
            continue
    return None


def _range_refusal(status: int, plain_text: str, headers: dict[str, str]) -> str:
    """What was wrong with a ``Range`` header, from the plain-text answer Starlette's files give it."""
    if status == 416:  # Content-Range: bytes */SIZE
        size = headers["content-range"].rpartition("/")[2]
        return f"the Range asked for covers no byte of the file ({size} bytes); ask for bytes in it, or leave Range out"
    reason = plain_text.removeprefix("Range header: ").rstrip(".")
    return f"cannot serve this Range header ({reason}); send bytes=START-END, or leave Range out"


def _precondition_refusal(file_headers: Headers, scope: Scope) -> str | None:
    """Why ``If-Match``, or without it ``If-Unmodified-Since``, refuses the file whose headers are ``file_headers``
    (RFC 9110, 13.2.2), if either does."""
    tag, if_match = file_headers["etag"], header(scope, b"if-match")
    if if_match is not None:
        return f"If-Match names no ETag of this file, which is {tag}" if precondition_failed(if_match, tag) else None
    since, last_change = header(scope, b"if-unmodified-since"), file_headers["last-modified"]
    unmodified_since = http_date(since)
    if unmodified_since is not None and http_date(last_change) > unmodified_since:
        return f"the file has changed since If-Unmodified-Since ({since}): it was last modified {last_change}"
    return None


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
    here. An ``If-Match`` that names no ETag of a file, or else an ``If-Unmodified-Since`` before its last change,
    is refused with a 412 in JSON (Starlette ignores both); an ``If-Modified-Since`` that is not one valid date is
    ignored (Starlette reads some such as dates). Any other answer, a 404 page of the folder's own among them, goes
    as it is. A dotfile, or a file in a dot-folder (``.env``, ``.git/``), is not served: it is answered as a missing
    file is, as is a file the server cannot read (its permissions, a loop of links), which the log names. A folder
    named without its final slash is redirected by a relative reference (its query kept), never to an address
    built from the request's ``Host``."""

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
                shown = bounded(path, LOGGED_TARGET)  # the client's words: no terminal escapes in the server's log
                logging.getLogger("digitgen.serve").warning("the page's %s cannot be read (%s)", shown, reason)
            return "", None
        return full_path, stat_result

    def is_not_modified(self, response_headers: Headers, request_headers: Headers) -> bool:
        if tags := ", ".join(request_headers.getlist("if-none-match")):  # several fields: one list (RFC 9110, 5.3)
            return not_modified(tags, response_headers["etag"])  # which If-Modified-Since then gives way to
        since = http_date(", ".join(request_headers.getlist("if-modified-since")))  # several: no valid date
        changed = http_date(response_headers["last-modified"])
        return since is not None and changed is not None and changed <= since

    def file_response(
        self, full_path: os.PathLike[str] | str, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = FileResponse(full_path, status_code=status_code, stat_result=stat_result)
        if status_code != 200:  # a 404 page, which older Starlette releases send here: no precondition applies to it
            return response
        if refused := _precondition_refusal(response.headers, scope):
            return refusal(412, refused)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
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
