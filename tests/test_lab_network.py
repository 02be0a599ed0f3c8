"""The real programs over the network lab (tests/lab.py): hosts in their own namespaces, home links shaped to
50 ms RTT and 20 Mbit/s, a NAT that lets no connection in, a link cut, a coordinator behind port forwarding.

Each test is one run of `lte-coordinator` and `lte-peer` processes inside lab hosts; everything they start is
stopped by pid (tests/netproc.py) and every namespace is deleted (tests/lab.py), and no packet may leave the
lab's 198.18.0.0/15 (the lab drops and counts them; the fixture asserts the counts are zero).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab import Host, Lab, Shape
from netproc import Network, Proc, base_hashes, disagreements, rounds_of, write_spec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

# Every host's link: 12.5 ms each way and direction, so 50 ms RTT between any two hosts, at 20 Mbit/s.
HOME_LINK = Shape(delay_ms=12.5, rate_mbit=20)
# Without loss scoring, as every protocol test (tests/netproc.py, Network.coordinator says why).
COORD_ARGS = ["--round-seconds", "2", "--fetch-timeout", "10", "--checkpoint-every", "1000", "--score-size", "0"]
HTTP_PORT = 8080

# Polls the coordinator's /status.json every 50 ms and prints each new (round, base hash) as a JSON line.
STATUS_POLLER = r"""
import json, sys, time, urllib.request
url, last = sys.argv[1], None
while True:
    try:
        s = json.load(urllib.request.urlopen(url, timeout=2))
        now = (s["round"], s["base_hash"])
        if now != last:
            print(json.dumps({"event": "status", "round": now[0], "base_hash": now[1]}), flush=True)
            last = now
    except Exception:
        pass
    time.sleep(0.05)
"""


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab
        escaped = lab.escaped_packets()
        assert not any(escaped.values()), f"packets addressed outside the lab: {escaped}"


def start_coordinator(net: Network, host: Host, workdir: Path, *extra: str) -> tuple[Proc, str]:
    spec = write_spec(workdir)
    proc = net.start("coordinator", **host.netproc(["-m", "coordinator.cli", "start", "--config", str(spec),
                                                    "--checkpoint-dir", str(workdir / "ck"), "--json",
                                                    "--host", host.ip, *COORD_ARGS, *extra]))
    line = net.wait_line(proc, lambda l: l.startswith("lte-peer join --dht "), 120, "the join line")
    return proc, line.split()[-1]


def start_peer(net: Network, host: Host, name: str, join: str, shard: str, *extra: str) -> Proc:
    return net.start(name, **host.netproc(["-m", "peer.cli", "join", "--dht", join, "--shard", shard, "--threads", "1",
                                           "--no-progress", "--json", "--name", name, "--host", host.ip, *extra]))


def run_to_end(net: Network, coord: Proc, peers: list[Proc], timeout: float) -> None:
    """Wait for the coordinator's last round, then for every peer to leave by itself (exit 0) once it has
    published the end of the run, and the coordinator after them."""
    net.wait_for(coord, lambda e: e.get("event") == "done", timeout, "the end of the run")
    for p in peers:
        assert net.wait_exit(p, 60) == 0, p.tail()
    assert net.wait_exit(coord, 60) == 0, coord.tail()


def assert_identical_bases(coord: Proc, peers: list[Proc], complete: list[Proc] | None = None,
                           through: int | None = None) -> None:
    """Every base a peer reported is the coordinator's base of that round, and each of the `complete` peers (by
    default all) reported one for every round (up to `through`)."""
    rounds = [r for r in sorted(rounds_of(coord)) if through is None or r <= through]
    for p in peers if complete is None else complete:
        missing = sorted(set(rounds) - {r for r, _, _ in base_hashes(p)})
        assert not missing, f"{p.name} reported no base for rounds {missing}:\n{p.tail(30)}"
    bad = disagreements(coord, peers)
    assert not bad, "\n".join(bad)


def members(coord: Proc) -> dict[int, int]:
    return {r: e["peers"] for r, e in rounds_of(coord).items()}


@pytest.mark.timeout(420)
def test_three_peers_over_home_links_agree_every_round_and_learn(lab, tmp_path):
    """Test 1 of the lab issue, and the defects it found: every member reaches every other at the address its
    digest announces (peer routing found none on 198.18.0.0/15), the round window leaves time to merge (peers
    trained instead of following), /status.json never shows one round with another's hash."""
    rounds = 8
    ch = lab.host("coord", HOME_LINK)
    hosts = [lab.host(f"peer{i}", HOME_LINK) for i in range(3)]
    with Network(tmp_path / "logs") as net:
        coord, join = start_coordinator(net, ch, tmp_path, "--max-rounds", str(rounds), "--min-peers", "3",
                                        "--http-port", str(HTTP_PORT))
        poller = net.start("status", **hosts[0].netproc(["-c", STATUS_POLLER,
                                                         f"http://{ch.ip}:{HTTP_PORT}/status.json"]))
        peers = [start_peer(net, h, f"p{i}", join, f"{i}/3") for i, h in enumerate(hosts)]
        run_to_end(net, coord, peers, 360)
        net.kill(poller)

    assert sorted(rounds_of(coord)) == list(range(1, rounds + 1))
    assert_identical_bases(coord, peers)
    # Members fetch each other's blobs directly: a fetch that fell back to the coordinator or failed would show
    # as a left-out member or a resync. On a loaded 2-core machine a member may miss one round.
    full = [r for r, n in members(coord).items() if n == 3]
    assert len(full) >= rounds - 1, f"members per round {members(coord)}\n{coord.tail(30)}"
    trained = {p.name: sum(1 for e in p.of("round") if e["merged"]) for p in peers}
    assert all(n >= rounds - 2 for n in trained.values()), f"rounds each peer trained for: {trained}"
    assert not any(p.of("resync")[1:] for p in peers), "a peer had to resync"
    # /status.json: each snapshot's hash is the committed base of the round it names (round 0: the initial one).
    committed = {r: e["base_hash"] for r, e in rounds_of(coord).items()}
    committed[0] = peers[0].of("resync")[0]["base_hash"]
    snaps = poller.of("status")
    assert len(snaps) >= rounds, snaps
    torn = [s for s in snaps if committed.get(s["round"]) != s["base_hash"]]
    assert not torn, f"status.json showed a round with another round's hash: {torn}"
    # The merged model learns over the run.
    # The merged model learns over the run. One evaluation of a tiny ViT after 8 short rounds is noisy (synchronous
    # runs of this test ended between 0.19 and 0.69), so ask for what learning must show: test loss clearly below
    # its start, and accuracy above its start and above 0.15 (chance is 0.10; 0.15 is over 3 binomial standard
    # deviations above it on the ~360-image test split).
    evals = [e for r, e in sorted(rounds_of(coord).items()) if "test_accuracy" in e]
    acc, loss = [e["test_accuracy"] for e in evals], [e["test_loss"] for e in evals]
    assert loss[-1] < loss[0] - 0.1, f"test loss per round {loss}"
    assert acc[-1] > acc[0] and acc[-1] > 0.15, f"test accuracy per round {acc}"


@pytest.mark.timeout(420)
def test_a_peer_behind_nat_finds_out_contributes_every_round_and_leaves_at_the_end(lab, tmp_path):
    """Test 2: a home peer started without --client-mode cannot be dialled back through its NAT, switches to
    client mode by itself, uploads its blobs to the coordinator (its upload is counted in the round window) and is
    merged in every round; and it leaves by itself when the run ends (it kept retrying for a minute before)."""
    rounds = 6
    ch = lab.host("coord", HOME_LINK)
    open_host = lab.host("peer0", HOME_LINK)
    home = lab.home_host("home1", HOME_LINK)
    with Network(tmp_path / "logs") as net:
        coord, join = start_coordinator(net, ch, tmp_path, "--max-rounds", str(rounds), "--min-peers", "2")
        peers = [start_peer(net, open_host, "p0", join, "0/2"), start_peer(net, home, "home", join, "1/2")]
        run_to_end(net, coord, peers, 360)

    p0, homep = peers
    assert homep.of("client_mode_detected") and not p0.of("client_mode_detected")
    assert_identical_bases(coord, peers)
    home_id = homep.of("joined")[0]["peer_id"]
    merged_home = [e for e in homep.of("round") if e["merged"]]
    # Every round except, at most, the one it joined in.
    assert len(merged_home) >= rounds - 1, f"home peer merged {len(merged_home)} of {rounds}:\n{homep.tail(30)}"
    assert all(home_id not in e.get("rejected", {}) for e in coord.of("round")), coord.tail(30)


@pytest.mark.timeout(480)
def test_a_cut_link_costs_the_others_nothing_and_the_cut_peer_recovers_by_itself(lab, tmp_path):
    """Test 3: p2's link is cut (100 % loss) for 30 s in the middle of a round. p0 and p1 finish that round and
    keep merging every round while it is down (a DHT write towards the dead node used to stall them for seconds
    each time); when the link is back, p2 catches up by itself and merges again, in the same process."""
    ch = lab.host("coord", HOME_LINK)
    hosts = [lab.host(f"peer{i}", HOME_LINK) for i in range(3)]
    with Network(tmp_path / "logs") as net:
        coord, join = start_coordinator(net, ch, tmp_path, "--min-peers", "2")
        peers = [start_peer(net, h, f"p{i}", join, f"{i}/3") for i, h in enumerate(hosts)]
        p2 = peers[2]
        # Cut p2 just after it joined the membership agreement of a round, once everyone has merged twice.
        for p in peers:
            net.wait_for(p, lambda e: e.get("event") == "round" and e["round"] >= 2 and e["merged"], 180, "round 2")
        ev = net.wait_for(p2, lambda e: e.get("event") == "phase" and e["phase"] == "agree" and e["round"] >= 2, 60,
                          "p2 agreeing")
        cut_round, cut_at = ev["round"], time.monotonic()
        hosts[2].cut()
        time.sleep(30)
        hosts[2].restore()
        restored_at = time.monotonic()
        pid = p2.pid
        back = net.wait_for(p2, lambda e: e.get("event") == "round" and e["merged"] and e["round"] > cut_round + 1,
                            150, "p2 merging again after the cut")
        assert p2.alive and p2.pid == pid  # recovered without a restart
        for p in peers:  # one more round, so every peer reports the base after p2's comeback
            net.wait_for(p, lambda e: e.get("event") == "round" and e["round"] > back["round"], 90, "the next round")

    recovered_s = back["_t"] - restored_at
    assert recovered_s < 120, recovered_s
    during = [e for e in coord.of("round") if cut_at + 1 <= e["_t"] <= restored_at]
    timeline = [(e["round"], e["peers"], round(e["_t"] - cut_at, 1)) for e in coord.of("round")]  # s after the cut
    assert len(during) >= 2, f"the others stopped while p2 was cut (restored at {restored_at - cut_at:.0f} s): {timeline}"
    assert sum(e["peers"] < 2 for e in during) <= 1, [(e["round"], e["peers"]) for e in during]
    for p in peers[:2]:
        got = {e["round"] for e in p.of("round") if e["merged"]}
        lost = [e["round"] for e in during if e["round"] not in got]
        assert len(lost) <= 1, f"{p.name} missed rounds {lost} during the cut:\n{p.tail(30)}"
    assert_identical_bases(coord, peers, complete=peers[:2], through=back["round"])


@pytest.mark.timeout(420)
def test_a_coordinator_behind_port_forwarding_prints_its_public_address(lab, tmp_path):
    """Test 4: the coordinator as a cloud VM sees it: a private address, behind a router that forwards its public
    address's port. With --announce-maddrs it prints a join line with the public address, and peers on the
    internet join with exactly that line."""
    port, rounds = 31337, 3
    ch = lab.forwarded_host("coord", port, HOME_LINK)
    hosts = [lab.host(f"peer{i}", HOME_LINK) for i in range(2)]
    public = f"/ip4/{ch.public_ip}/tcp/{port}"
    with Network(tmp_path / "logs") as net:
        coord, join = start_coordinator(net, ch, tmp_path, "--port", str(port), "--announce-maddrs", public,
                                        "--max-rounds", str(rounds), "--min-peers", "2")
        assert join.startswith(public + "/p2p/"), join
        assert ch.ip != ch.public_ip
        peers = [start_peer(net, h, f"p{i}", join, f"{i}/2") for i, h in enumerate(hosts)]
        run_to_end(net, coord, peers, 300)
    assert_identical_bases(coord, peers)
    assert all(n == 2 for n in members(coord).values()), members(coord)
