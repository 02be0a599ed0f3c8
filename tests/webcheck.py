"""HTTP helpers for the tests of the coordinator's web face and the Prometheus endpoints (stdlib + prometheus-client's
own parser; every request has a timeout)."""
from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from netproc import Network, Proc


def get(url: str, timeout: float = 10.0) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def get_json(url: str, timeout: float = 10.0) -> Any:
    return json.loads(get(url, timeout)[2])


def scrape(url: str, timeout: float = 10.0) -> dict[str, Metric]:
    """A Prometheus endpoint, parsed by prometheus-client's parser: {family name: family}."""
    status, ctype, body = get(url, timeout)
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def status_base_url(net: Network, coord: Proc, timeout: float = 60.0) -> str:
    """`http://host:port` of a coordinator started with --http-port (from the line it prints)."""
    line = net.wait_line(coord, lambda l: l.startswith("status: http://"), timeout, "the status URL line")
    m = re.match(r"status: (http://[^/\s]+)/status\.json", line)
    assert m, line
    return m.group(1)
