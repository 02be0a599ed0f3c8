"""Prometheus endpoints of a real run: `lte-coordinator --http-port` (/metrics) and `lte-peer --metrics-port`, scraped
over HTTP and parsed with prometheus-client's own parser, checked against each other, against /status.json and
against the events the peer prints. Plus the peer's refusals of a bad --metrics-port.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import lte.validate

from netproc import ROOT, SMALL_SPEC, Network, Proc, new_identity, write_spec
from webcheck import get_json, scrape, status_base_url

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

RUN = "digits-vit-tiny"
ROUNDS = 3  # merged rounds the peer must have seen before we scrape

# What each process must export, with its type as the text-format parser reports it (an info metric is a gauge
# there). Counter and histogram families are named without their _total / _bucket suffixes by the parser.
COMMON = {"lte_run_info": "gauge", "lte_round": "gauge", "lte_round_peers": "gauge", "lte_samples": "counter",
          "lte_local_loss": "gauge", "lte_round_duration_seconds": "histogram", "lte_sent_bytes": "counter",
          "lte_received_bytes": "counter", "lte_rejected_contributions": "counter"}
COORDINATOR = {**COMMON, "lte_live_peers": "gauge", "lte_eval_round": "gauge", "lte_eval_accuracy_ratio": "gauge",
               "lte_eval_loss": "gauge", "lte_checkpoint_saves": "counter", "lte_merge_duration_seconds": "histogram"}
PEER = {**COMMON, "lte_steps_per_second": "gauge", "lte_contributed_samples": "counter",
        "lte_dropped_samples": "counter", "lte_pending_samples": "gauge", "lte_resyncs": "counter"}


def value(families: dict, name: str, **labels: str) -> float:
    """The value of one sample (`name` as exposed, e.g. lte_samples_total) with exactly these labels."""
    for fam in families.values():
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels or ''}")


def by_label(families: dict, family: str, sample: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in families[family].samples if s.name == sample}


def samples_of(families: dict) -> list[tuple]:
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for f in families.values() for s in f.samples)


def quiet_snapshot(base: str, peer_url: str, deadline_s: float) -> tuple[dict, dict, dict]:
    """(coordinator metrics, /status.json, peer metrics) taken while nothing changed: both endpoints scraped twice
    around the status read, kept only when each answered the same both times (rounds keep running meanwhile)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        c1, p1 = scrape(f"{base}/metrics"), scrape(peer_url)
        status = get_json(f"{base}/status.json")
        c2, p2 = scrape(f"{base}/metrics"), scrape(peer_url)
        if samples_of(c1) == samples_of(c2) and samples_of(p1) == samples_of(p2):
            return c2, status, p2
        time.sleep(0.2)
    raise AssertionError(f"no quiet moment to scrape within {deadline_s:.0f} s")


def assert_families(families: dict, expected: dict[str, str], who: str) -> None:
    missing = sorted(set(expected) - set(families))
    assert not missing, f"{who}: missing metric families {missing}"
    wrong = {n: (families[n].type, t) for n, t in expected.items() if families[n].type != t}
    assert not wrong, f"{who}: (type, expected type) {wrong}"
    assert all(n.startswith("lte_") for n in families), f"{who}: unprefixed {sorted(families)}"


def round_events(peer: Proc, up_to: int) -> list[dict[str, Any]]:
    return [e for e in peer.of("round") if e["round"] <= up_to]


@pytest.mark.timeout(600)
def test_metrics_of_a_live_run(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SMALL_SPEC.replace("merge_every: 20", "merge_every: 5"))
    peer_id = new_identity(tmp_path / "p0.id")
    with Network(tmp_path / "logs") as net:
        coord, join = net.coordinator(spec, tmp_path / "ck", "--http-port", "0", "--round-seconds", "2",
                                      "--fetch-timeout", "10", "--checkpoint-every", "2")
        base = status_base_url(net, coord)
        peer = net.peer("p0", join, "0/1", "--metrics-port", "0", "--identity", str(tmp_path / "p0.id"))
        peer_url = net.wait_for(peer, lambda e: e.get("event") == "metrics", 120, "the metrics URL")["url"]
        net.wait_for(peer, lambda e: e.get("event") == "round" and e["round"] >= ROUNDS, 420, f"round {ROUNDS}")

        c, status, p = quiet_snapshot(base, peer_url, 120)
        assert_families(c, COORDINATOR, "coordinator")
        assert_families(p, PEER, "peer")

        # the same run on both sides, and the coordinator agrees with its own /status.json
        for fams in (c, p):
            assert value(fams, "lte_run_info", run=RUN, spec_hash=status["spec_hash"]) == 1
        rc, rp = int(value(c, "lte_round")), int(value(p, "lte_round"))
        assert rc == status["round"] >= ROUNDS
        assert value(c, "lte_eval_round") == status["evaluation"]["round"]
        assert value(c, "lte_eval_accuracy_ratio") == pytest.approx(status["evaluation"]["test_accuracy"])
        assert value(c, "lte_eval_loss") == pytest.approx(status["evaluation"]["test_loss"])
        assert 0.0 <= value(c, "lte_eval_accuracy_ratio") <= 1.0 and value(c, "lte_eval_loss") > 0
        assert value(c, "lte_round_peers") == value(c, "lte_live_peers") == 1
        assert value(c, "lte_checkpoint_saves_total") == rc // 2  # --checkpoint-every 2

        # samples: the peer's own books balance, and match what its round events and the coordinator report
        net.wait_for(peer, lambda e: e.get("event") == "round" and e["round"] >= max(rc, rp), 120,
                     "the peer's round events up to the scraped rounds")  # it counts a merge just before printing it
        trained = value(p, "lte_samples_total")
        contributed = value(p, "lte_contributed_samples_total")
        assert trained > 0 and value(p, "lte_dropped_samples_total") == 0
        assert trained == contributed + value(p, "lte_pending_samples")
        assert contributed == sum(e["samples"] for e in round_events(peer, rp)) > 0
        assert value(c, "lte_samples_total") == sum(e["samples"] for e in round_events(peer, rc)) \
            == status["leaderboard"][0]["samples"]
        assert status["leaderboard"][0]["peer"] == peer_id
        assert value(p, "lte_resyncs_total") == 1  # the download of the base when it joined
        assert value(p, "lte_round_peers") == 1 and value(p, "lte_steps_per_second") > 0
        assert value(p, "lte_local_loss") > 0 and value(c, "lte_local_loss") > 0

        # round timing: the coordinator times each commit after its first; the peer each merge after its download
        assert value(c, "lte_merge_duration_seconds_count") == rc
        assert value(c, "lte_round_duration_seconds_count") == rc - 1
        assert value(p, "lte_round_duration_seconds_count") == len(round_events(peer, rp)) > 0
        for fams in (c, p):
            assert value(fams, "lte_round_duration_seconds_sum") > 0
            assert value(fams, "lte_round_duration_seconds_bucket", le="+Inf") == \
                value(fams, "lte_round_duration_seconds_count")

        # bytes: the peer serves its factors, manifests and replicas to the coordinator and downloads the base from
        # it; what one side received the other sent (a receiver can only miss chunks of a stream that broke off)
        c_sent, c_recv = (by_label(c, f"lte_{d}_bytes", f"lte_{d}_bytes_total", "kind") for d in ("sent", "received"))
        p_sent, p_recv = (by_label(p, f"lte_{d}_bytes", f"lte_{d}_bytes_total", "kind") for d in ("sent", "received"))
        assert {"factors", "manifest", "replicas"} <= set(c_recv) and {"factors", "manifest", "replicas"} <= set(p_sent)
        # ...and, to serve the newest checkpoint too, fetches its meta.json
        assert "base" in p_recv and set(c_sent) == set(p_recv) <= {"base", "checkpoint"}
        assert 0 < sum(c_recv.values()) <= sum(p_sent.values())
        assert 0 < p_recv["base"] <= c_sent["base"]
        assert p_recv.get("checkpoint", 0) <= c_sent.get("checkpoint", 0)

        # a healthy run rejects nothing, and every known reason is exported (as 0) from the start
        assert by_label(c, "lte_rejected_contributions", "lte_rejected_contributions_total", "reason") == \
            {reason: 0 for reason in lte.validate.REASONS}
        assert by_label(p, "lte_rejected_contributions", "lte_rejected_contributions_total", "reason") == \
            {"hash_mismatch": 0, "blob_hash_mismatch": 0, "commit_invalid": 0}
        assert not peer.of("hash_mismatch")

        # docs/metrics.md documents every exported metric, and the example dashboard queries only exported ones
        documented = set(re.findall(r"`(lte_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
        exposed = {f.name + ("_total" if f.type == "counter" else "") for f in (*c.values(), *p.values())
                   if not f.name.endswith("_created")}  # prometheus-client's start times, documented as such
        assert not exposed - documented, f"undocumented: {sorted(exposed - documented)}"
        dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
        queried = {m for panel in dashboard["panels"] for t in panel["targets"]
                   for m in re.findall(r"lte_\w+", t["expr"])}
        sample_names = {s.name for f in (*c.values(), *p.values()) for s in f.samples}
        assert queried and not queried - sample_names, f"dashboard queries unknown {sorted(queried - sample_names)}"


def _peer_exits_with(args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "peer.cli", "join", "--dht", "/ip4/127.0.0.1/tcp/1/p2p/QmNotThere",
                        "--no-progress", "--host", "127.0.0.1", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr.strip()


@pytest.mark.timeout(300)
def test_peer_refuses_a_bad_metrics_port() -> None:
    rc, err = _peer_exits_with(["--metrics-port", "70000"])
    assert (rc, err) == (2, "lte-peer join: error: argument --metrics-port: 70000 is out of range (must be in "
                            "0..65535) (see --help)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = _peer_exits_with(["--metrics-port", str(port)])
    assert rc == 2 and err.startswith(f"lte-peer: error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}: "), err
    assert "\n" not in err and "Traceback" not in err
