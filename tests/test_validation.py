"""Contribution validation (lte/validate.py): the rules on their own, then a real run with a hostile peer that
sends every kind of bad contribution; the base must always be the merge of the honest contributions only."""
from __future__ import annotations

import math
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from lte.merge import HeadContribution
from lte.validate import (NORM_FACTOR, Rejected, check_tensors, digest_problem, norm_bound, samples_cap,
                          update_norm)
from tests.adversary import EXPECTED
from tests.netproc import Network, new_identity, write_spec
from tests.webcheck import status_base_url


def _contribution(seed: int, prev: bool, scale: float = 1.0) -> tuple[HeadContribution, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    factors = {"l1": (torch.randn(4, 16, generator=g), scale * torch.randn(12, 4, generator=g)),
               "l2": (torch.randn(4, 8, generator=g), scale * torch.randn(8, 4, generator=g))}
    prev_factors = {k: (torch.randn_like(a), torch.randn_like(b)) for k, (a, b) in factors.items()} if prev else None
    base = {"norm.weight": torch.ones(8)}
    reps = {"norm.weight": torch.ones(8) + 0.1 * torch.randn(8, generator=g)}
    return HeadContribution(f"p{seed}", 10, factors, reps, prev_factors), base


@pytest.mark.parametrize("prev", [False, True])
def test_update_norm_is_the_norm_of_the_dense_update(prev):
    c, base = _contribution(1, prev)
    squares = 0.0
    for layer, (a, b) in c.factors.items():
        d = b.double() @ a.double()
        if prev:
            pa, pb = c.prev_factors[layer]
            d = d - pb.double() @ pa.double()
        squares += float(d.pow(2).sum())
    squares += float((c.replicas["norm.weight"].double() - 1).pow(2).sum())
    assert update_norm(c, base) == pytest.approx(math.sqrt(squares), rel=1e-12)
    # a dense-path delta counts as what it is
    dense = HeadContribution("p1", 10, {"l2": c.factors["l2"]}, c.replicas,
                             {"l2": c.prev_factors["l2"]} if prev else None,
                             {"l1": (c.factors["l1"][1] @ c.factors["l1"][0]
                                     - (c.prev_factors["l1"][1] @ c.prev_factors["l1"][0] if prev else 0))})
    assert update_norm(dense, base) == pytest.approx(math.sqrt(squares), rel=1e-5)


def test_a_scaled_delta_is_above_the_bound_and_honest_ones_below():
    honest = [update_norm(*_contribution(s, True)) for s in range(3)]
    attacker = update_norm(*_contribution(9, True, scale=1000.0))
    bound = norm_bound(honest + [attacker])
    assert max(honest) <= bound < attacker
    # with only one honest peer in a round, the accepted norms of earlier rounds keep the bound honest
    assert norm_bound([honest[0], attacker], history=honest) < attacker
    # an attacker that shrinks its delta to drag the median down cannot get an honest peer rejected in a
    # round where honest contributions are the majority
    tiny = update_norm(*_contribution(8, True, scale=1e-6))
    assert max(honest) <= norm_bound(honest + [tiny])
    assert norm_bound([]) == math.inf and norm_bound([2.0]) == NORM_FACTOR * 2.0


def test_claimed_samples_are_capped_at_a_multiple_of_the_median():
    assert samples_cap([100, 120, 10**9]) == 4 * 120
    assert samples_cap([10**9], history=[100, 100, 100]) == 400
    assert samples_cap([]) == 1


def test_tensor_checks_name_the_reason():
    good = [torch.zeros(4, 16), torch.zeros(12, 4)]
    shapes = [(4, 16), (12, 4)]
    assert check_tensors("f", good, shapes) == good
    cases = {"malformed": [good[0]], "wrong_dtype": [good[0].double(), good[1]],
             "nonfinite": [good[0], torch.full((12, 4), float("inf"))]}
    cases["malformed_shape"] = [torch.zeros(5, 16), good[1]]
    for reason, tensors in cases.items():
        with pytest.raises(Rejected) as err:
            check_tensors("f", tensors, shapes)
        assert err.value.reason == reason.removesuffix("_shape")
    nan = [good[0].clone(), good[1]]
    nan[0][3, 3] = float("nan")
    with pytest.raises(Rejected, match="nonfinite"):
        check_tensors("f", nan, shapes)


def test_digest_checks():
    assert digest_problem("s", 3, 10, "s", 3) is None
    assert digest_problem("x", 3, 10, "s", 3) == "spec_mismatch"
    assert digest_problem("s", 2, 10, "s", 3) == "stale_round"
    assert digest_problem("s", 3, 0, "s", 3) == "no_samples"


# ----- a real run with a hostile peer -------------------------------------------------------------------------
@pytest.mark.timeout(720)
def test_a_hostile_peer_is_rejected_for_each_kind_and_bases_stay_the_honest_merge(tmp_path):
    """Coordinator + two honest peers + a peer that corrupts its contribution in a different way every round (and
    forges the run record): each bad contribution is rejected for its reason, for everyone; the honest peers are
    merged in every round but at most two (a loaded machine can cost one a group) and end every round with the
    coordinator's base, which therefore is the merge of the honest contributions only; a peer that joins after the forgery joins the real run. The run is closed (--allow-peers): an unlisted peer is
    refused at join with one line, and one that skips that check is left out of every round. The base learns."""
    spec = write_spec(tmp_path)
    ids = {n: new_identity(tmp_path / f"{n}.id") for n in ["h0", "h1", "adv", "late", "outsider"]}
    adv_id, outsider_id = ids["adv"], ids["outsider"]
    (tmp_path / "allow.txt").write_text("# the run's volunteers\n" + "\n".join(
        i for n, i in ids.items() if n != "outsider") + "\n")
    kinds = list(EXPECTED)

    def identity(name: str) -> list[str]:
        return ["--identity", str(tmp_path / f"{name}.id")]

    def hostile(name: str, shard: str, env: dict[str, str]):
        return net.start(f"{name}-hostile", ["tests/adversary.py", "join", "--dht", join, "--shard", shard, "--threads", "1",
                                "--no-progress", "--json", "--name", name, "--host", "127.0.0.1", *identity(name)],
                         env=env)

    with Network(tmp_path / "logs") as net:
        coord, join = net.coordinator(spec, tmp_path / "ck", "--min-peers", "3", "--round-seconds", "2",
                                      "--fetch-timeout", "4", "--checkpoint-every", "1000", "--eval-every", "1",
                                      "--http-port", "0", "--allow-peers", str(tmp_path / "allow.txt"),
                                      # every honest contribution must be merged here: loss scoring rejects a few %
                                      # of honest member-rounds (tests/test_scoring.py measures it), not a format check
                                      "--score-size", "0")
        metrics_url = status_base_url(net, coord) + "/metrics"
        honest = {n: net.peer(n, join, f"{i}/3", *identity(n)) for i, n in enumerate(["h0", "h1"])}
        adv = hostile("adv", "2/3", {"LTE_ADVERSARY": ",".join(kinds), "LTE_FORGE_SPEC": "1"})
        refused = net.peer("outsider", join, "1/3", *identity("outsider"))
        assert net.wait_exit(refused, 120) == 2
        assert "is closed and does not list this peer" in refused.stderr_text().strip(), refused.tail()
        assert len(refused.stderr_text().strip().splitlines()) == 1 and "Traceback" not in refused.stderr_text()
        hostile("outsider", "1/3", {"LTE_IGNORE_ALLOWLIST": "1"})
        net.wait_for(adv, lambda e: e.get("event") == "forged", 180, "the forged run record")
        late = None
        checked: dict[str, int] = {}
        rounds = []
        missed = dict.fromkeys(honest, 0)  # rounds each honest peer was not merged in
        start = 0
        while set(checked) != set(kinds) or late is None or not _merged_like_coordinator(late, rounds):
            ev = net.wait_for(coord, lambda e: e.get("event") == "round", 240, "the next round", start)
            start, k = ev["_i"] + 1, ev["round"] - 1
            rounds.append(ev)
            if ev["peers"]:
                members = set(ev["members"])
                # only honest peers are merged: the two, and the late joiner once it runs
                assert members <= {ids["h0"], ids["h1"]} | ({ids["late"]} if late is not None else set()), ev
                for name, p in honest.items():  # every honest peer ends the round with the committed base
                    got = net.wait_for(p, lambda e: e.get("event") == "round" and e["round"] == k + 1, 60,
                                       f"{name}'s round {k + 1}")
                    assert got["base_hash"] == ev["base_hash"] and got["merged"] == (ids[name] in members), \
                        (name, ev["rejected"], got, ev)
                    missed[name] += ids[name] not in members
                if ids["late"] in members:
                    got = net.wait_for(late, lambda e: e.get("event") == "round" and e["round"] == k + 1, 60,
                                       f"the late joiner's round {k + 1}")
                    assert got["merged"] and got["base_hash"] == ev["base_hash"], (got, ev)
            rejected = dict(ev["rejected"])
            assert rejected.pop(outsider_id, "unauthorized") == "unauthorized", ev["rejected"]
            attack = [e for e in adv.of("attack") if e["round"] == k]
            if attack and adv_id in rejected:
                kind = attack[-1]["kind"]
                assert rejected == {adv_id: EXPECTED[kind]}, (attack[-1], ev["rejected"])
                checked[kind] = k
            else:
                assert not rejected, ev["rejected"]
            if late is None and len(checked) >= 3:  # the forged record has long been in the DHT
                late = net.peer("late", join, "0/3", *identity("late"))
            assert len(rounds) < 60, f"not every kind was tried after 60 rounds: checked {checked}"
        # A peer on a loaded machine can miss a group now and then (it follows that round's commit); more would mean
        # hostile contributions cost honest ones their rounds.
        assert max(missed.values()) <= 2, (missed, len(rounds))
        for p in [*honest.values(), late]:
            assert not p.of("commit_invalid") and not p.of("hash_mismatch"), p.tail()
        accuracy = [e["test_accuracy"] for e in rounds if "test_accuracy" in e]
        assert accuracy[-1] > accuracy[0], accuracy
        rejected = _rejected_metric(metrics_url)
        for reason in [*map(EXPECTED.get, kinds), "unauthorized"]:
            assert rejected.get(reason, 0) >= 1, (reason, rejected)


def _merged_like_coordinator(proc, rounds) -> bool:
    """The late joiner merged a round as a member, ending with the coordinator's base of that round."""
    by_round = {e["round"]: e["base_hash"] for e in rounds}
    return any(e["merged"] and by_round.get(e["round"]) == e["base_hash"] for e in proc.of("round"))


def _rejected_metric(url: str) -> dict[str, float]:
    """lte_rejected_contributions_total by reason, as the coordinator serves it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
            if fam.name == "lte_rejected_contributions" for s in fam.samples if s.name.endswith("_total")}


@pytest.mark.timeout(300)
def test_a_round_that_merges_nobody_leaves_the_base_as_it_was(tmp_path):
    """The only member is rejected, so the commit merges nobody and keeps the base's hash. The rejected peer must
    hold that base too, not its locally trained replicas (CI saw a hash mismatch and a needless resync when the
    only member of a round had failed its fetch)."""
    spec = write_spec(tmp_path)
    with Network(tmp_path / "logs") as net:
        coord, join = net.coordinator(spec, tmp_path / "ck", "--min-peers", "1", "--round-seconds", "2",
                                      "--checkpoint-every", "1000")
        adv = net.start("adv-hostile", ["tests/adversary.py", "join", "--dht", join, "--shard", "0/1", "--threads",
                                        "1", "--no-progress", "--json", "--name", "adv", "--host", "127.0.0.1"],
                        env={"LTE_ADVERSARY": "nan"})
        for k in range(3):
            ev = net.wait_for(coord, lambda e: e.get("event") == "round" and e["round"] == k + 1, 180, f"round {k}")
            assert ev["peers"] == 0 and list(ev["rejected"].values()) == ["nonfinite"], ev
        net.wait_for(adv, lambda e: e.get("event") == "round" and e["round"] == 3, 60, "the peer's round 2")
        assert len(adv.of("contribution_rejected")) >= 2, adv.tail()
        assert not adv.of("hash_mismatch"), adv.of("hash_mismatch")
        assert len(adv.of("resync")) == 1, adv.of("resync")  # the one at join
        bases = {e["round"]: e["base_hash"] for e in adv.of("round")}
        assert len(set(bases.values())) == 1, bases  # nobody merged: every round keeps the first base


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content, expected", [
    (None, "cannot read it"),
    ("# nobody yet\n", "lists no peer id"),
    ("QmSxqVGmbGuFJDUy3aE1S4ohHQ5FpB9WPnNhPm2iPg16JV\nnot-a-peer-id\n", "line 2: 'not-a-peer-id' is not a peer id"),
])
def test_a_bad_allowlist_is_one_line_and_exit_2(tmp_path, content, expected):
    import subprocess

    allow = tmp_path / "allow.txt"
    if content is not None:
        allow.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "start", "--config", "configs/digits.yaml",
                           "--checkpoint-dir", str(tmp_path / "ck"), "--allow-peers", str(allow)],
                          capture_output=True, text=True, timeout=100, cwd=Path(__file__).resolve().parents[1])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "ck").exists(), "nothing is created for a refused start"
