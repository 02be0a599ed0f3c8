"""One real run with 3 honest peers and one peer from tests/adversary.py (honest itself when `kinds` is empty), for
tests/test_scoring.py and benchmarks/adversaries.py: the coordinator's round events, who was rejected for what, and
whether every honest peer ended each round with the coordinator's base.

Peers keep their identities (and so their heads' seeds) across runs given the same `ids_dir`, so an honest-only
run and a poisoned one differ only by the adversary and by timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lte.score import SCORE_SIZE
from tests.netproc import Network, Proc, new_identity, write_spec

HONEST = ("h0", "h1", "h2")


@dataclass
class RunResult:
    rounds: list[dict[str, Any]]  # the coordinator's round events, in order
    adversary: str  # its peer id
    honest: dict[str, str]  # name -> peer id
    attacks: dict[int, str] = field(default_factory=dict)  # round -> kind, for the rounds the adversary joined
    mismatches: list[str] = field(default_factory=list)  # honest peers' rounds that did not end on the commit's base
    wall_s: float = 0.0
    probe: Any = None

    @property
    def final_accuracy(self) -> float:
        return [e["test_accuracy"] for e in self.rounds if "test_accuracy" in e][-1]

    def final_accuracy_mean(self, last: int = 5) -> float:
        """Mean test accuracy of the last `last` evaluated rounds: on the 397 test images one round's accuracy moves
        by 1-2 points from the next even in a converged run, so one evaluation cannot compare two runs to 1 point."""
        acc = [e["test_accuracy"] for e in self.rounds if "test_accuracy" in e][-last:]
        return sum(acc) / len(acc)

    def adversary_rounds(self) -> dict[int, str | None]:
        """Round -> the adversary's rejection reason (None: merged), for the rounds it was a member of. A round
        counts when its contribution was merged, or rejected after being fetched."""
        out = {}
        for e in self.rounds:
            k = e["round"] - 1
            if k in self.attacks and (self.adversary in e["rejected"] or self.adversary in e["members"]):
                out[k] = e["rejected"].get(self.adversary)
        return out

    def honest_rejections(self) -> tuple[int, int]:
        """(rejected, member rounds) over the honest peers: rounds where they were merged or rejected."""
        ids = set(self.honest.values())
        rejected = sum(len(ids & set(e["rejected"])) for e in self.rounds)
        merged = sum(len(ids & set(e["members"])) for e in self.rounds)
        return rejected, merged + rejected


def identities(ids_dir: Path) -> dict[str, str]:
    """name -> peer id, creating the identity files once."""
    ids_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in (*HONEST, "adv"):
        path = ids_dir / f"{name}.id"
        out[name] = new_identity(path) if not path.exists() else _peer_id(path)
    return out


def _peer_id(path: Path) -> str:
    from hivemind.p2p import PeerID

    return PeerID.from_identity(path.read_bytes()).to_base58()


def run(workdir: Path, ids_dir: Path, kinds: list[str], rounds: int, spec_text: str | None = None,
        score_size: int | None = None, round_seconds: float = 2.0, timeout_s: float = 600.0,
        per_kind: int = 0, join_after: int = 0, adversary: bool = True, coordinator_args: tuple[str, ...] = (),
        probe: Callable[[Network, Proc], Any] | None = None, schedule: str = "sync") -> RunResult:
    """Coordinator + h0..h2 + the adversary cycling through `kinds`, until the coordinator has committed `rounds`
    rounds that merged someone and the adversary has been screened in at least `per_kind` rounds of each kind; then
    everything is stopped. With `join_after`, the adversary (or the honest 4th peer) starts once the coordinator has
    committed that many rounds. With `adversary=False` the 4th peer never starts: the honest peers alone. `probe(net, coordinator)` runs before that (its result is `RunResult.probe`).

    Peers run `--schedule sync` by default: the scoring is the coordinator's and does not depend on the peers'
    schedule, but pipelined peers (2 T steps a round here) train this model to convergence in about 10 rounds,
    after which honest updates no longer move the scoring loss (scores within +-0.03 of 0), so a free rider can no
    longer be told from them by what it does (nor does it do harm): 0 of 10 free-rider rounds were rejected."""
    import time

    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    ids = identities(ids_dir)
    spec = write_spec(workdir) if spec_text is None else write_spec(workdir, spec_text)
    extra = ["--score-size", str(SCORE_SIZE if score_size is None else score_size)]
    with Network(workdir / "logs") as net:
        coord, join = net.coordinator(spec, workdir / "ck", "--min-peers", "3", "--round-seconds", str(round_seconds),
                                      "--fetch-timeout", "6", "--checkpoint-every", "1000", "--eval-every", "1",
                                      *extra, *coordinator_args)
        honest = {n: net.peer(n, join, f"{i}/4", "--identity", str(ids_dir / f"{n}.id"), "--schedule", schedule)
                  for i, n in enumerate(HONEST)}
        if join_after and adversary:
            net.wait_for(coord, lambda e: e.get("event") == "round" and e["round"] >= join_after, timeout_s,
                         f"round {join_after}")
        adv = None if not adversary else net.start("adv", ["tests/adversary.py", "join", "--dht", join, "--shard", "3/4", "--threads", "1",
                                "--host", "127.0.0.1",
                                "--no-progress", "--json", "--name", "adv", "--identity", str(ids_dir / "adv.id"),
                                "--schedule", schedule],
                        env={"LTE_ADVERSARY": ",".join(kinds)})
        events: list[dict[str, Any]] = []
        start, merged = 0, 0
        deadline = time.monotonic() + timeout_s
        def short_of_kinds() -> bool:
            attacks = {e["round"]: e["kind"] for e in adv.of("attack")} if adv is not None else {}
            screened = RunResult(events, ids["adv"], {}, attacks).adversary_rounds()
            return any(sum(attacks[k] == kind for k in screened) < per_kind for kind in kinds)

        while merged < rounds or (per_kind and short_of_kinds()):
            left = deadline - time.monotonic()
            assert left > 0, f"only {merged} of {rounds} rounds merged in {timeout_s:.0f} s\n{net.tails()}"
            ev = net.wait_for(coord, lambda e: e.get("event") == "round", left, "the next round", start)
            start = ev["_i"] + 1
            events.append(ev)
            merged += ev["peers"] > 0
        mismatches = []
        last = events[-1]["round"]
        for name, p in honest.items():  # every honest peer ends each round it merged with the commit's base
            net.wait_for(p, lambda e: e.get("event") == "round" and e["round"] >= last, 120, f"{name}'s last round")
            by_round = {e["round"]: e["base_hash"] for e in events}
            for e in p.of("round"):
                if e["round"] in by_round and e["base_hash"] != by_round[e["round"]]:
                    mismatches.append(f"{name} round {e['round']}")
            mismatches += [f"{name}: {e['event']} in round {e['round']}" for e in p.events
                           if e.get("event") in ("hash_mismatch", "commit_invalid")]
        attacks = {e["round"]: e["kind"] for e in adv.of("attack")} if adv is not None else {}
        probed = probe(net, coord) if probe is not None else None
    return RunResult(events, ids["adv"], {n: ids[n] for n in HONEST}, attacks, mismatches, time.monotonic() - t0,
                     probed)
