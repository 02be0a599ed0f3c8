"""The coordinator's HTTP face: `/status.json` for people and tools, `/metrics` for Prometheus."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class StatusServer:
    """Serves a status snapshot (a callable, read on each request) and a Prometheus registry from a thread."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]], registry: CollectorRegistry):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/status.json":
                    outer._send(self, 200, "application/json", json.dumps(status(), indent=1).encode())
                elif path == "/metrics":
                    outer._send(self, 200, CONTENT_TYPE_LATEST, generate_latest(registry))
                else:
                    outer._send(self, 404, "text/plain", b"not found\n")

            def log_message(self, *args: Any) -> None:  # keep the console for round lines
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise OSError(f"cannot serve HTTP on {host}:{port}: {err.strerror}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)
        self._thread.start()

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
