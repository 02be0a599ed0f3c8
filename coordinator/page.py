"""The status page served at `GET /`: one self-contained HTML file (page.html, package data) with its own CSS and
JavaScript and no external assets (coordinators often run where there is no internet). The page polls
/status.json and draws everything itself, so the server only hands out these static bytes."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def status_page() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()
