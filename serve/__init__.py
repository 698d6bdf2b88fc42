"""digitgen over HTTP (the ``serve`` extra: FastAPI, uvicorn, prometheus-client).

from digitgen import DigitGenerator
from digitgen.serve import create_app

app = create_app(DigitGenerator.from_path())  # any ASGI server runs it; or mount it in your app
"""

from typing import TYPE_CHECKING, Any

from digitgen.serve.settings import ServeConfigError, ServeSettings

if TYPE_CHECKING:
    from digitgen.serve.app import create_app

__all__ = ["ServeConfigError", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    """``create_app`` loaded on first use, so that the settings need no FastAPI (the command line reads them)."""
    if name == "create_app":
        from digitgen.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
