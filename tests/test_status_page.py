"""The coordinator's status page (`GET /`) in a real headless Chromium, against a real run (coordinator + 1 peer).

Chromium runs the page's JavaScript (`--dump-dom` prints the DOM after it ran, `--virtual-time-budget` lets its
fetch and timers run) and takes a screenshot, saved as a test artifact (path printed). Without a `chromium` on
PATH the test is skipped, loudly, unless LTE_REQUIRE_BROWSER is set (as .ci/run does): then it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin

import pytest

from netproc import ROOT, SMALL_SPEC, Network, new_identity, write_spec
from webcheck import get, get_json, status_base_url

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

ARTIFACT = ROOT / "tests" / "artifacts" / "status-page.png"
# A run name full of markup: the page must show it as text, never parse it.
RUN = 'digits <b id="injected">bold</b> & "co"'
EVALUATED_ROUNDS = 3


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        why = ("chromium not found on PATH: the status page was NOT checked in a browser "
               "(apt-get install chromium; .ci/run installs it and sets LTE_REQUIRE_BROWSER=1)")
        if os.environ.get("LTE_REQUIRE_BROWSER"):
            pytest.fail(f"{why}; LTE_REQUIRE_BROWSER is set")
        warnings.warn(why)
        pytest.skip(why)
    return exe


def run_chromium(exe: str, profile: Path, args: list[str], url: str, timeout: float = 120.0) -> str:
    """Run headless Chromium once; returns its stdout. It runs in its own session, and that whole process group
    (its zygote, renderer and GPU helpers) is killed afterwards, so nothing it started outlives the call."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--virtual-time-budget=8000", *args, url]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err[-3000:]}"
    return out


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def walk(self) -> Iterator["Node"]:
        yield self
        for c in self.children:
            yield from c.walk()

    def find(self, tag: str | None = None, **attrs: str) -> list["Node"]:
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def by_id(self, ident: str) -> "Node":
        found = self.find(id=ident)
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]


class DOM(HTMLParser):
    """The DOM Chromium dumped, as a small tree (the stdlib has no HTML tree builder)."""

    VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "source", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].parts.append(data)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.timeout(600)
def test_status_page_in_chromium(tmp_path: Path, chromium: str) -> None:
    spec = write_spec(tmp_path, SMALL_SPEC.replace("run: digits-vit-tiny", f"run: '{RUN}'")
                      .replace("merge_every: 20", "merge_every: 5"))
    peer_id = new_identity(tmp_path / "p0.id")
    with Network(tmp_path / "logs") as net:
        coord, join = net.coordinator(spec, tmp_path / "ck", "--http-port", "0", "--round-seconds", "2",
                                      "--fetch-timeout", "10", "--eval-every", "1", "--checkpoint-every", "2")
        base = status_base_url(net, coord)
        net.peer("p0", join, "0/1", "--identity", str(tmp_path / "p0.id"))
        net.wait_for(coord, lambda e: e.get("event") == "round" and e["round"] >= EVALUATED_ROUNDS
                     and "test_accuracy" in e, 420, f"an evaluated round {EVALUATED_ROUNDS}")

        status, ctype, page = get(f"{base}/")
        assert status == 200 and ctype.startswith("text/html")
        assert b"http://" not in page.replace(b'"http://www.w3.org/2000/svg"', b"") and b"https://" not in page, \
            "the page must not load anything from elsewhere"

        before = get_json(f"{base}/status.json")
        dom = DOM(run_chromium(chromium, tmp_path / "profile", ["--dump-dom"], f"{base}/")).root
        after = get_json(f"{base}/status.json")

        assert dom.by_id("conn").attrs["class"] == "pill live", "the page could not read status.json"
        assert dom.by_id("run").text == RUN and not dom.find(id="injected"), "the run name was parsed as HTML"
        assert before["round"] <= int(dom.by_id("round").text) <= after["round"]
        assert len(dom.by_id("base-hash").attrs["title"]) == 64
        assert dom.by_id("join").text == before["join"] == f"lte-peer join --dht {join}"

        board = dom.by_id("leaderboard").find("tbody")[0]
        assert [td.text for td in board.find("td", class_="mono")] == [peer_id]
        cells = board.find("td")  # rank, peer, samples, rounds, quality (its mean loss improvement), rejected, state
        assert len(cells) == 7, [td.text for td in cells]

        plot = dom.by_id("plot")
        acc = plot.find("polyline", **{"data-series": "test_accuracy"})
        loss = plot.find("polyline", **{"data-series": "mean_loss"})
        assert len(acc) == 1 and len(loss) == 1
        assert len(acc[0].attrs["points"].split()) >= EVALUATED_ROUNDS + 1  # round 0 is evaluated too
        assert len(loss[0].attrs["points"].split()) >= EVALUATED_ROUNDS
        assert len(plot.find("circle", class_="pt")) >= EVALUATED_ROUNDS + 1

        # The page read status.json between `before` and `after`, and a checkpoint may have been saved in between:
        # its newest row (newest first, each linking model and meta) must be the newest of one of the two.
        links = [a.attrs["href"] for a in dom.by_id("checkpoints").find("a")]
        newest = []
        for snapshot in (before, after):
            ckpts = snapshot.get("checkpoints") or []
            newest.append([urljoin(f"{base}/", ckpts[0][k]) for k in ("model_url", "meta_url")] if ckpts else [])
        assert links[:2] in newest, f"the page's newest checkpoint {links[:2]} is neither of {newest}"
        if not links:
            assert "display" not in dom.by_id("checkpoints-none").attrs.get("style", "")
        assert dom.by_id("spec").text.startswith("{") and '"merge_every": 5' in dom.by_id("spec").text

        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.unlink(missing_ok=True)
        run_chromium(chromium, tmp_path / "profile", [f"--screenshot={ARTIFACT}", "--window-size=1280,1600"],
                     f"{base}/")
        assert png_size(ARTIFACT) == (1280, 1600) and ARTIFACT.stat().st_size > 20_000
        print(f"status page screenshot: {ARTIFACT}")


def test_curve_stays_bounded_and_even() -> None:
    """The status page's curve covers the whole run in fewer than 500 points, however long the run, at one even
    resolution; round 0 (the untrained model) and the newest round are always there, and thinning never loses the
    evaluated rounds (here every other round) to the unevaluated ones."""
    from coordinator.curve import Curve

    curve = Curve()
    curve.add(0, None, 0.1, 2.3)
    for r in range(1, 5001):
        curve.add(r, 2.0 - r / 5000, 0.1 + r / 10000 if r % 2 == 0 else None, None)
        rounds = [p["round"] for p in curve.points()]
        assert len(rounds) < 500 and rounds[0] == 0 and rounds[-1] == r and rounds == sorted(set(rounds))
    points = curve.points()
    gaps = {b["round"] - a["round"] for a, b in zip(points[1:-2], points[2:-1])}
    assert gaps == {16}, gaps  # 5000 rounds at 2 x 249 points at most: one point per 16 rounds
    assert all(p["test_accuracy"] is not None for p in points)


@pytest.mark.timeout(60)
def test_status_json_stays_json_when_the_loss_is_nan() -> None:
    """A diverged run reports a NaN loss: /status.json must still be strict JSON (null there), or the status page
    (and jq) could not read any of it."""
    from prometheus_client import CollectorRegistry

    from coordinator.http import StatusServer

    server = StatusServer("127.0.0.1", 0, lambda: {"round": 3, "curve": [{"round": 3, "mean_loss": float("nan"),
                                                                          "test_loss": float("inf")}]},
                          CollectorRegistry())
    try:
        _, ctype, body = get(f"http://127.0.0.1:{server.port}/status.json")
    finally:
        server.close()
    assert ctype == "application/json"
    strict = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in status.json"))
    assert strict == {"round": 3, "curve": [{"round": 3, "mean_loss": None, "test_loss": None}]}
