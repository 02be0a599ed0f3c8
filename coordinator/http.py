"""The coordinator's HTTP face: `/` (the status page) for people, `/status.json` for it and for tools, `/metrics` for
Prometheus, `/checkpoints/` for downloads over plain HTTP."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from lte.net.http import QuietHTTPServer

from coordinator.checkpoints import CheckpointStore
from coordinator.page import status_page

def json_safe(value: Any) -> Any:
    """NaN and infinities (the loss of a diverged run) as null: they are not JSON, and a browser's JSON parser, the
    status page's included, refuses the whole document over one of them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_CHECKPOINT_FILE = re.compile(r"/checkpoints/(\d{1,12})/(model\.safetensors|meta\.json)")


class StatusServer:
    """Serves a status snapshot (a callable, read on each request) and a Prometheus registry from a thread."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]], registry: CollectorRegistry,
                 checkpoints: CheckpointStore | None = None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):  # the status page: static; it polls /status.json itself
                    outer._send(self, 200, "text/html; charset=utf-8", status_page())
                elif path == "/status.json":
                    body = json.dumps(json_safe(status()), indent=1, allow_nan=False).encode()
                    outer._send(self, 200, "application/json", body)
                elif path == "/metrics":
                    outer._send(self, 200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif checkpoints is not None and path.startswith("/checkpoints"):
                    outer._send_checkpoint(self, checkpoints, path)
                else:
                    outer._send(self, 404, "text/plain", b"not found\n")

            def log_message(self, *args: Any) -> None:  # keep the console for round lines
                pass

        try:
            self.httpd = QuietHTTPServer((host, port), Handler)
        except OSError as err:
            raise OSError(f"cannot serve HTTP on {host}:{port}: {err.strerror}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)
        self._thread.start()

    @classmethod
    def _send_checkpoint(cls, handler: BaseHTTPRequestHandler, checkpoints: CheckpointStore, path: str) -> None:
        """`/checkpoints/` (the list, newest first) and `/checkpoints/<round>/<file>`. Only rounds the store holds and
        its two file names are looked up, so no request path ever reaches the file system."""
        if path in ("/checkpoints/", "/checkpoints"):
            cls._send(handler, 200, "application/json", json.dumps(checkpoints.listing(), indent=1).encode())
            return
        m = _CHECKPOINT_FILE.fullmatch(path)
        file = checkpoints.file(int(m.group(1)), m.group(2)) if m else None
        try:
            f = open(file, "rb") if file is not None else None  # open before it can be retired: the fd stays valid
        except OSError:
            f = None
        if f is None:
            cls._send(handler, 404, "text/plain", b"no such checkpoint\n")
            return
        with f:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json" if file.name.endswith(".json")
                                else "application/octet-stream")
            handler.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            handler.send_header("Content-Disposition", f'attachment; filename="{file.name}"')
            handler.end_headers()
            shutil.copyfileobj(f, handler.wfile)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
