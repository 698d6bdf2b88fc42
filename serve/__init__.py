"""digitgen over HTTP (the ``serve`` extra: FastAPI, uvicorn, prometheus-client).

from digitgen import DigitGenerator
from digitgen.serve import create_app

app = create_app(DigitGenerator.from_path())  # any ASGI server runs it; or mount it in your app
"""

from digitgen.serve.app import ServeConfigError, ServeSettings, create_app

__all__ = ["ServeConfigError", "ServeSettings", "create_app"]
