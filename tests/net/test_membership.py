"""Round membership agreement with real averagers in separate processes."""
from __future__ import annotations

import signal
import time

import pytest

from lte.net import GroupNotFound
from lte.net.membership import MAX_DIGEST_BYTES, Membership, round_bits
from lte.net.node import shutdown_dht, start_dht

PREFIX = "test_members"


def _participant(initial_peers, client_mode, rounds, digest, min_size, arrive_at=None, scheduled_time=None):
    """One node: start a DHT and a Membership, agree on each round, return [(round, seconds, result, me)]."""
    dht = start_dht(initial_peers, client_mode=client_mode)
    members = None
    try:
        members = Membership(dht, PREFIX, min_matchmaking_time=1.5, request_timeout=1.0)
        out = []
        for round_id in rounds:
            if arrive_at is not None:
                time.sleep(max(0.0, arrive_at - time.time()))
            started = time.monotonic()
            result = members.agree(
                round_id, {**digest, "round": round_id}, deadline_s=30, min_size=min_size, scheduled_time=scheduled_time
            )
            out.append((round_id, time.monotonic() - started, result, members.peer_id))
        return out
    finally:
        if members is not None:
            members.shutdown()
        shutdown_dht(dht)


def test_round_bits():
    assert round_bits(5) == "0" * 29 + "101" and len(round_bits(2**40 + 1)) == 32
    with pytest.raises(ValueError):
        round_bits(-1)


@pytest.mark.timeout(120)
def test_three_processes_agree_on_identical_dicts(swarm, processes):
    """A coordinator that does not train, a peer, and a client-mode peer, over two consecutive rounds."""
    swarm.start()
    roles = [
        (False, {"role": "coordinator", "samples": 0}),  # joins without contributing: says so in its digest
        (False, {"role": "peer", "samples": 640}),
        (True, {"role": "nat-peer", "samples": 320}),
    ]
    outs = processes(_participant, [(swarm.maddrs, c, [1, 2], d, 3) for c, d in roles], timeout=90)
    for round_index, round_id in enumerate([1, 2]):
        results = [out[round_index][2] for out in outs]
        assert all(r == results[0] for r in results), "members got different dicts"
        assert set(results[0]) == {out[0][3] for out in outs}  # keyed by each member's own peer id
        assert sorted(v["role"] for v in results[0].values()) == ["coordinator", "nat-peer", "peer"]
        assert all(v["round"] == round_id for v in results[0].values())
    print("agreement seconds per node, rounds 1 and 2:", [[round(o[1], 2) for o in out] for out in outs])


@pytest.mark.timeout(120)
def test_participants_of_different_rounds_never_mix(swarm, processes):
    swarm.start()
    rounds = [7, 7, 8, 8]
    args = [(swarm.maddrs, False, [r], {"me": i}, 2) for i, r in enumerate(rounds)]
    outs = processes(_participant, args, timeout=90)
    for i, out in enumerate(outs):
        round_id, _, result, _ = out[0]
        assert round_id == rounds[i]
        assert {v["round"] for v in result.values()} == {round_id}
        assert sorted(v["me"] for v in result.values()) == [j for j, r in enumerate(rounds) if r == round_id]


@pytest.mark.timeout(120)
def test_shared_scheduled_time_keeps_late_arrivals_in_one_group(swarm, processes):
    """Arrivals spread over more than min_matchmaking_time still form one group when they share the closing time."""
    swarm.start()
    start = time.time() + 8.0  # after every worker has started its DHT and averager
    close = start + 4.0
    args = [(swarm.maddrs, False, [5], {"me": i}, 2, start + 1.2 * i, close) for i in range(3)]
    outs = processes(_participant, args, timeout=90)
    results = [out[0][2] for out in outs]
    assert all(r == results[0] for r in results) and len(results[0]) == 3


@pytest.mark.timeout(60)
def test_no_group_by_deadline_raises(swarm):
    dht = swarm.start()
    sigint_before = signal.getsignal(signal.SIGINT)
    members = Membership(dht, PREFIX, min_matchmaking_time=1.0, request_timeout=0.5)
    try:
        assert signal.getsignal(signal.SIGINT) is sigint_before  # hivemind would have set SIG_IGN here
        with pytest.raises(ValueError, match="exceeds"):
            members.agree(1, {"blob": "x" * MAX_DIGEST_BYTES}, deadline_s=5)
        started = time.monotonic()
        with pytest.raises(GroupNotFound, match="round 3"):
            members.agree(3, {"n": 1}, deadline_s=3, min_size=2)
        assert time.monotonic() - started < 3 + 5
    finally:
        members.shutdown()
