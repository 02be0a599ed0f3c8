"""HTTP servers that never ask DNS who they are.

`http.server.HTTPServer.server_bind`, and with it wsgiref's server behind prometheus_client's exporter, calls
`socket.getfqdn(host)` on every start: a reverse DNS query for the listen address, sent to the machine's resolver.
Nothing here uses the name, and a run must not send traffic that it does not need (the network lab caught these
queries leaving a coordinator's host). These servers keep the address as the server's name instead.
"""
from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from http.server import ThreadingHTTPServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["QuietHTTPServer", "serve_metrics"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class _NoLookup:
    """Binds without the reverse DNS lookup, keeping the address as the server's name; IPv4 or IPv6 by the address
    given. Goes first in the bases of a socketserver class."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self.address_family = _family(address[0])
        super().__init__(address, handler)  # type: ignore[call-arg]

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # type: ignore[arg-type]
        host, port = self.server_address[:2]  # type: ignore[attr-defined]
        self.server_name, self.server_port = str(host), port


class QuietHTTPServer(_NoLookup, ThreadingHTTPServer):
    """`ThreadingHTTPServer` without the reverse DNS lookup at bind."""


class _QuietWSGIServer(_NoLookup, socketserver.ThreadingMixIn, WSGIServer):
    def server_bind(self) -> None:
        super().server_bind()
        self.setup_environ()


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # scrapes are not worth a line on the console
        pass


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """prometheus_client's exporter for `registry` on `host:port` (any path answers), from a daemon thread."""
    server = _QuietWSGIServer((host, port), _SilentHandler)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
