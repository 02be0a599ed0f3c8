"""The coordinator: first DHT node of a run, holder of the authoritative base, commit point of every round.

It trains nothing. Each round it joins the membership agreement, fetches every member's blobs, merges the
members whose blobs arrived before the deadline, and publishes a signed commit (member set + resulting base
hash) that every peer follows, so all participants merge exactly the same contributions. See docs/protocol.md.
"""
from __future__ import annotations

import copy
import math
import re
import secrets
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from hivemind.utils import get_dht_time

import lte
from lte.checkpoint import CheckpointError, CheckpointMeta, state_hash
from lte.config import RunSpec
from lte.data import load_datasets
from lte.errors import ConfigError
from lte.lora import prepare_model
from lte.merge import apply_update
from lte.models import check_fits, create_base_model
from lte.net import GroupNotFound, NetworkError
from lte.net.access import unlisted
from lte.net.blobs import BlobService
from lte.net.membership import AGREE_GRACE_S, Membership
from lte.net.metrics import fetch_failure_reason
from lte.net.node import shutdown_node, start_dht, visible_maddrs
from lte.net.procs import signals_deferred
from lte.net.records import (bind_owner, default_validators, fingerprint, load_or_create_private_key, owner_tag,
                              publish_base_hash, publish_signed, read, read_base_hashes)
from lte.merge import merge_contributions
from lte.net.rounds import (BASE, PROTOCOL_VERSION, Digest, alive_key, as_dense, base_key, base_to_tensors, commit_key,
                            fetch_contributions, round_dense_layers, run_prefix, spec_key)
from lte.train import evaluate
from lte.shards import DEFAULT_SHARD_BYTES
from lte.score import (SCORE_HISTORY_ROUNDS, SCORE_RECENT, SCORE_SIZE, SCORE_WARMUP_ROUNDS, Scorer, score_floor,
                       score_problem, scoring_indices)
from lte.validate import HISTORY_ROUNDS, digest_problem, norm_bound, samples_cap, update_norm
from lte.wire import Layout

from coordinator.checkpoints import ADDRESS_FILE, CheckpointPublisher, CheckpointStore, resume_fields
from coordinator.curve import Curve
from coordinator.data import data_publisher
from coordinator.metrics import CoordinatorMetrics

# Rounds of members' blobs the coordinator keeps serving (the newest committed round and the ones before it).
# Peers need one round back for V; a peer that merges slowly (a dead member's dense slices waited for, a loaded
# machine, a just-joined peer) needs the round it is merging while the coordinator commits the next ones, and
# fetches it from here when the member itself is gone. Costs a round's blobs of memory per extra round.
ROUNDS_KEPT = 3
MAX_CONCURRENT_FETCHES = 8  # members whose blobs are fetched at once (each a few streams; p2pd serves them all)
KEEP_S = 60.0


# A live peer whose cycle is more than this many times the fleet's (lower) median sets no round's pace.
STRAGGLER_FACTOR = 2.0


def round_window(cycles: Iterable[float], round_seconds: float) -> float:
    """Seconds a round stays open: 1.5 x the longest cycle among the live peers that keep the fleet's pace, + 1 s
    (at least `round_seconds`), so those peers merge, train T steps and upload within it even when slowed down.

    A peer whose cycle is more than STRAGGLER_FACTOR x the lower median sets no pace: sizing every window for it
    would idle every faster peer (with two peers the faster one sets the pace). It loses nothing: it trains on
    through the rounds that close without it, follows their commits between two steps, and contributes its steps
    to the first round it reaches (peer.service.Peer._follow_passed_rounds). Cycles of 0 (not timed yet) count
    for nothing."""
    timed = sorted(t for t in cycles if t > 0)
    if not timed:
        return round_seconds
    pace = max(t for t in timed if t <= STRAGGLER_FACTOR * statistics.median_low(timed))
    return max(round_seconds, 1.5 * pace + 1.0)


@dataclass
class CoordinatorOptions:
    checkpoint_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: tuple[str, ...] = ()
    upnp: bool = False
    http_port: int | None = None
    identity: Path | None = None
    round_seconds: float = 4.0
    fetch_timeout: float = 20.0
    eval_every: int = 1
    checkpoint_every: int = 5
    wire: str | None = None  # None: the spec's lte.wire
    max_rounds: int | None = None
    min_peers: int = 1
    paths: str = "auto"  # auto | factors | dense: how merged layers travel between peers
    keep_last: int = 5  # checkpoints: keep the last K, every M-th round, and always `latest`
    keep_every: int = 100
    allow: frozenset[str] | None = None  # a closed run's peer ids (lte/net/access.py); None: open
    score_size: int = SCORE_SIZE  # examples in the private scoring set (lte/score.py); 0: no scoring
    shard_bytes: int = DEFAULT_SHARD_BYTES  # size of the training data shards peers download (coordinator/data.py)


@dataclass
class PeerStats:
    samples: int = 0
    rounds: int = 0
    last_round: int = -1
    # what the member's updates did to the loss of the scoring set (lte/score.py), rejected ones included
    scored: int = 0
    score_sum: float = 0.0
    last_score: float | None = None
    rejected: int = 0


class Coordinator:
    def __init__(self, spec: RunSpec, opts: CoordinatorOptions):
        self.spec, self.opts = spec, opts
        self.run, self.spec_hash = spec.run, spec.spec_hash()
        if (spec.lte.outer_lr, spec.lte.outer_momentum) != (1.0, 0.0):  # peers would merge without it: refuse
            raise ConfigError("lte.outer_lr and lte.outer_momentum run in the simulator only so far: the network's "
                              "merge has no outer step yet (issue 13); use 1.0 and 0.0")
        # the key first: an unreadable --identity is refused before the checkpoint directory is made
        self.key = load_or_create_private_key(opts.identity or opts.checkpoint_dir / "coordinator.key")
        opts.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.owner = owner_tag(self.key)
        # before anything slow: a checkpoint directory of another run is refused at once
        self.checkpoints = CheckpointStore(opts.checkpoint_dir, opts.keep_last, opts.keep_every)
        resumed = resume_fields(self.checkpoints, self.spec_hash, self.owner)
        torch.manual_seed(spec.seed)
        self.eval_model = create_base_model(spec.model).eval()
        self.base: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}
        self.layout = Layout.of(prepare_model(copy.deepcopy(self.eval_model),
                                              spec.lte.model_copy(update={"heads": 1}), spec.seed))
        train_set, self.test_set = load_datasets(spec.data, spec.seed)
        check_fits(self.eval_model, self.test_set, f"data.dataset={spec.data.dataset}")
        self.scorer = self._scorer(train_set, opts.score_size)
        # the training split only: the test split this coordinator evaluates on never leaves it
        self.data = data_publisher(spec, train_set, opts.checkpoint_dir, self.key, self.owner, opts.shard_bytes)
        self.score_history: list[float] = []  # accepted scores of the last rounds: they join each round's pool
        self.scores: dict[str, float] = {}  # the current round's, peer id -> score
        self.score_floor = float("-inf")  # the current round's floor (lte/score.py)
        self.recent_scores: dict[str, list[float]] = {}  # each member's last SCORE_RECENT scores
        self.round = 0
        self.base_hash = state_hash(self.base)
        self.head_lock = threading.Lock()
        self.commit_times: dict[int, float] = {}  # round -> when it was committed (monotonic): blob retention
        self.peers: dict[str, PeerStats] = {}
        self.metrics = CoordinatorMetrics(self)
        self.curve = Curve()
        self.evaluation: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.merges: list[dict[str, Any]] = []  # merged rounds since the last checkpoint: {"round", "samples"}
        # accepted update norms and samples of the last rounds: they join each round's pool (lte/validate.py)
        self.norm_history: list[float] = []
        self.samples_history: list[int] = []
        self.rejected: dict[str, str] = {}  # the current round's, peer id -> reason
        self.finished = False
        self.checkpoints_saved = 0
        if resumed is not None:
            self._resume(resumed[1], resumed[2])
        else:
            self.evaluate()  # round 0 too, so a run's curve starts at the untrained model
            self.curve.add(self.round, None, self.evaluation["test_accuracy"], self.evaluation["test_loss"])
        # A new id per coordinator life, in the base and commit records: a coordinator resumed from an older
        # checkpoint commits rounds again, and peers must not take the earlier life's commit of the same round.
        self.epoch = secrets.token_hex(8)
        self.dht = self.blobs = self.members = None
        try:
            self.dht = self._start_dht(resumed is not None)
            self.peer_id = self.dht.peer_id.to_base58()
            self.blobs = BlobService(self.dht, namespace=run_prefix(self.run), accept_push=True)
            self.members = Membership(self.dht, prefix=run_prefix(self.run))
            if self.data is not None:
                self.data.serve(self.blobs)
            self.next_close = get_dht_time() + opts.round_seconds
            self.publisher = CheckpointPublisher(self.dht, self.blobs, self.run, self.owner)
            self.publish_spec()
            self.publish_base()  # and the checkpoint record: a resumed coordinator serves its checkpoints at once
            (opts.checkpoint_dir / ADDRESS_FILE).write_text(self.join_addr() + "\n")
        except BaseException:
            self.close()  # a half-started node must not leave DHT or p2pd processes behind
            raise

    def _scorer(self, train_set: Any, size: int) -> Scorer | None:
        """The private scoring set (lte/score.py): `size` training examples picked with a secret kept in the
        checkpoint directory, so a restarted coordinator scores on the same set and no peer knows which it is."""
        if size <= 0:
            return None
        secret_file = self.opts.checkpoint_dir / "scoring.secret"
        if not secret_file.is_file():
            secret_file.write_bytes(secrets.token_bytes(32))
            secret_file.chmod(0o600)
        idx = scoring_indices(len(train_set), size, secret_file.read_bytes())
        if isinstance(train_set, torch.utils.data.TensorDataset):
            x, y = (t[idx] for t in train_set.tensors[:2])
        else:
            items = [train_set[i] for i in idx]
            x, y = torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
        return Scorer(copy.deepcopy(self.eval_model), x, y, self.spec.lte.scale)

    def _resume(self, meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> None:
        """Continue the run from its latest checkpoint: base, round, peer stats, history, evaluation."""
        if set(state) != set(self.base):
            raise CheckpointError(f"checkpoint round {meta.round} does not hold this run's model (other tensor names)")
        self.base = {k: state[k] for k in self.base}
        self.round, self.base_hash = meta.round, meta.base_hash
        self.peers = {pid: PeerStats(**st) for pid, st in meta.peers.items()}
        self.history = list(meta.history)
        self.evaluation = meta.evaluation
        for point in getattr(meta, "curve", None) or []:
            self.curve.add(point["round"], point.get("mean_loss"), point.get("test_accuracy"), point.get("test_loss"))
        print(f"resumed run {self.run} at round {self.round} from {self.checkpoints.latest().path}", flush=True)

    def _start_dht(self, resuming: bool):
        """The run's first DHT node. Resuming with --port 0, it listens where it did before if it can: peers that
        lost it know it only by that address (and its peer id, which p2p.id keeps)."""
        port = self.opts.port
        before = self.opts.checkpoint_dir / ADDRESS_FILE
        if resuming and not port and before.is_file():
            m = re.search(r"/tcp/(\d+)/", before.read_text())
            port = int(m.group(1)) if m else 0
        try:
            return start_dht([], host=self.opts.host, port=port, identity_path=str(self.opts.checkpoint_dir / "p2p.id"),
                             validators=default_validators(self.key), announce_maddrs=list(self.opts.announce_maddrs),
                             upnp=self.opts.upnp)
        except NetworkError as err:
            if port == self.opts.port:
                raise
            # Not another port: the run's coordinator may still be running there, and two nodes with one peer id
            # would split the run.
            raise NetworkError(f"cannot listen again on port {port}, where this run's coordinator was ({err}): is it "
                               "still running? Stop it, or pass --port (running peers will not find a new port)") \
                from None

    # ----- records ------------------------------------------------------------------------------------------
    def join_addr(self) -> str:
        return visible_maddrs(self.dht)[0]

    def publish_spec(self) -> None:
        publish_signed(self.dht, spec_key(self.peer_id), {
            "spec": self.spec.model_dump(mode="json"), "spec_hash": self.spec_hash, "version": lte.__version__,
            "protocol": PROTOCOL_VERSION, "coordinator": self.peer_id, "wire": self.opts.wire or self.spec.lte.wire,
            "paths": self.opts.paths,
            "round_seconds": self.opts.round_seconds, "fetch_timeout": self.opts.fetch_timeout,
            "allow": sorted(self.opts.allow) if self.opts.allow is not None else None,
            "binding": bind_owner(self.opts.checkpoint_dir / "p2p.id", self.owner),
            "data": self.data.record() if self.data is not None else None,
        }, self.owner, ttl=3600)

    def publish_base(self) -> None:
        sha = self.blobs.put(base_to_tensors(self.base), kind=BASE, round_id=self.round)
        publish_signed(self.dht, base_key(self.run), {
            "round": self.round, "hash": self.base_hash, "blob": sha, "close": self.next_close,
            "window": round(max(0.0, self.next_close - get_dht_time()), 3),
            "finished": self.finished, "min_size": self.opts.min_peers + 1, "epoch": self.epoch,
        }, self.owner, ttl=3600)
        self.publisher.refresh(self.checkpoints)

    # ----- one round ----------------------------------------------------------------------------------------
    def run_round(self) -> dict[str, Any] | None:
        """Agree on members, fetch, merge, commit. Returns the round's summary, or None when no peer came."""
        k, close = self.round, self.next_close
        me = Digest(coordinator=True, spec=self.spec_hash, k=k).to_dict()
        try:
            gathered = self.members.agree(k, me, deadline_s=max(1.0, close - get_dht_time()) + 2.0,
                                          min_size=self.opts.min_peers + 1,
                                          scheduled_time=max(close, get_dht_time() + 0.5))
        except GroupNotFound:
            self.next_close = get_dht_time() + self.window([])
            self.publish_base()
            return None
        t0 = time.perf_counter()
        digests = {pid: Digest.from_dict(d) for pid, d in gathered.items()
                   if pid != self.peer_id and not Digest.from_dict(d).coordinator}
        accepted, contributions, bound = self._screen(k, digests)
        dense = round_dense_layers(self.layout, accepted, self.opts.paths)
        with signals_deferred():  # base, round and checkpoint change together: a SIGTERM waits until they have
            return self._commit(k, t0, accepted, contributions, dense, bound, close)

    def _screen(self, k: int, digests: dict[str, Digest]) -> tuple[dict[str, Digest], list[Any], float]:
        """Round k's members that pass every check of lte/validate.py, their fetched contributions, and the
        round's norm bound. Rejections go to `self.rejected` (for the commit), the metric and the log."""
        self.rejected = {}
        ok = {}
        for pid, d in sorted(digests.items()):
            problem = "unauthorized" if unlisted([pid], self.opts.allow) else \
                digest_problem(d.spec, d.k, d.n, self.spec_hash, k)
            if problem:
                self._reject(k, pid, problem, f"digest: spec {d.spec[:12]}, round {d.k}, samples {d.n}")
            else:
                ok[pid] = d
        # The weight a member claims is capped before anything is merged, so the commit records what counts.
        cap = samples_cap([d.n for d in ok.values()], self.samples_history)
        ok = {pid: replace(d, n=min(d.n, cap)) for pid, d in ok.items()}
        # Members are fetched side by side: one after another, a round of M members on slow links took M fetch times
        # (the lab measured 5.3 s before the commit for 3 ViT-S members at 100 Mbit/s), and one slow member held up all.
        def fetch(pid: str, d: Digest) -> Any:
            return fetch_contributions(self.blobs, self.layout, {pid: d}, {pid: [pid]}, k, self.opts.fetch_timeout,
                                       self.layout.layers)[0]

        with ThreadPoolExecutor(max_workers=max(1, min(MAX_CONCURRENT_FETCHES, len(ok)))) as pool:
            pending = {pid: pool.submit(fetch, pid, d) for pid, d in ok.items()}
        fetched = {}
        for pid, future in pending.items():
            try:
                fetched[pid] = future.result()
            except Exception as err:  # a member that cannot deliver is left out, for everyone alike
                self._reject(k, pid, fetch_failure_reason(err), str(err))
        norms = {pid: update_norm(c, self.base) for pid, c in fetched.items()}
        bound = norm_bound(norms.values(), self.norm_history)
        for pid, norm in norms.items():
            if norm > bound:
                self._reject(k, pid, "norm_outlier", f"update norm {norm:.4g} > bound {bound:.4g}")
        self._score(k, {pid: c for pid, c in fetched.items() if pid not in self.rejected})
        accepted = {pid: ok[pid] for pid in fetched if pid not in self.rejected}
        self.score_history = (self.score_history + [self.scores[p] for p in accepted if p in self.scores]
                              )[-SCORE_HISTORY_ROUNDS * max(1, len(accepted)):]
        self.norm_history = (self.norm_history + [norms[p] for p in accepted])[-HISTORY_ROUNDS * max(1, len(accepted)):]
        self.samples_history = (self.samples_history + [ok[p].n for p in accepted])[-HISTORY_ROUNDS * max(1, len(accepted)):]
        return accepted, [fetched[p] for p in sorted(accepted)], bound

    def _score(self, k: int, contributions: dict[str, Any]) -> None:
        """Score the members that passed every other check by what their update alone does to the scoring set's
        loss, and reject those below the round's floor (lte/score.py). Sets `self.scores` and `self.score_floor`."""
        self.scores, self.score_floor = {}, float("-inf")
        if self.scorer is None or not contributions:
            return
        t0 = time.perf_counter()
        # the weights the merge would give them all (lte.round_samples: a fixed denominator, lte/merge.py)
        total = max(sum(c.samples for c in contributions.values()), self.spec.lte.round_samples)
        self.scores = {pid: self.scorer.score(self.base, self.base_hash, c, c.samples / total)
                       for pid, c in sorted(contributions.items())}
        self.metrics.scored(time.perf_counter() - t0, self.scores.values())
        floor = score_floor(self.scores.values(), self.score_history)
        self.score_floor = floor.value
        for pid, score in self.scores.items():
            st = self.peers.setdefault(pid, PeerStats())  # on the leaderboard with its score, merged or not
            st.last_score = score if math.isfinite(score) else None
            if st.last_score is not None:
                st.scored, st.score_sum = st.scored + 1, st.score_sum + score
            warming_up = k < SCORE_WARMUP_ROUNDS
            # warm-up scores stay out of the means: an honest member's early dips would weigh on it for rounds
            recent = self.recent_scores.get(pid, []) + ([] if warming_up else [score])
            self.recent_scores[pid] = recent = recent[-SCORE_RECENT:]
            problem = score_problem(score, recent, floor, warming_up=warming_up)
            if problem:
                self._reject(k, pid, "score_outlier", problem)

    def _reject(self, k: int, pid: str, reason: str, detail: str) -> None:
        self.rejected[pid] = reason
        self.metrics.reject(reason)
        if pid in self.peers:
            self.peers[pid].rejected += 1
        print(f"round {k}: rejected {pid} ({reason}): {detail}", flush=True)

    def _commit(self, k: int, t0: float, accepted: dict[str, Digest], contributions: list[Any],
                dense: list[str], bound: float, close: float) -> dict[str, Any]:
        new_hash = self.base_hash
        if contributions:
            contributions = [as_dense(c, dense) for c in contributions]
            apply_update(self.base, merge_contributions(contributions, self.spec.lte.scale, self.spec.lte.round_samples,
                                                        self.base))
            new_hash = state_hash(self.base)
        publish_signed(self.dht, commit_key(self.run, k), {
            "round": k, "members": {pid: d.to_dict() for pid, d in accepted.items()}, "hash": new_hash,
            "epoch": self.epoch, "rejected": dict(self.rejected), "bound": bound,
            "scores": _finite(self.scores), "score_floor": _finite(self.score_floor),
        }, self.owner, ttl=600)
        committed_after = get_dht_time() - close  # what every peer waits before it can merge (round latency)
        merge_s = time.perf_counter() - t0
        with self.head_lock:  # /status.json and /metrics read these together: never one round's number with another's
            self.round, self.base_hash = k + 1, new_hash
            self.metrics.committed(merge_s)
        self.commit_times[k] = time.monotonic()
        self.next_close = get_dht_time() + self.window([d.t for d in accepted.values()])
        self.publish_base()
        publish_base_hash(self.dht, self.run, self.round, self.peer_id, self.base_hash, wait=False)
        self.blobs.store.drop_rounds_before(self._oldest_round_kept())
        for pid, d in accepted.items():
            st = self.peers.setdefault(pid, PeerStats())
            st.samples, st.rounds, st.last_round = st.samples + d.n, st.rounds + 1, k
        if accepted:
            self.merges.append({"round": self.round, "samples": {pid: d.n for pid, d in accepted.items()}})
        summary = {"round": self.round, "peers": len(accepted), "members": sorted(accepted), "merge_s": merge_s,
                   "commit_s": committed_after,
                   "rejected": dict(self.rejected),
                   "scores": _finite(self.scores), "score_floor": _finite(self.score_floor),
                   "dense_layers": len(dense),
                   "mean_loss": (sum(d.loss for d in accepted.values()) / len(accepted)) if accepted else None,
                   "base_hash": self.base_hash, "bytes_received": sum(self.blobs.traffic.received.values()),
                   "bytes_sent": sum(self.blobs.traffic.sent.values())}
        if accepted and self.round % self.opts.eval_every == 0:
            self.evaluate()
            summary.update(test_accuracy=self.evaluation["test_accuracy"], test_loss=self.evaluation["test_loss"])
        self.history.append(summary)
        self.curve.add(self.round, summary["mean_loss"], summary.get("test_accuracy"), summary.get("test_loss"))
        if self.round % self.opts.checkpoint_every == 0:  # last: its meta.json holds this round's history too
            summary["checkpoint"] = str(self.save_checkpoint())
        return summary

    def _oldest_round_kept(self) -> int:
        """Members' blobs are served for ROUNDS_KEPT rounds and, on slow links where rounds are short next to a
        merge, for at least KEEP_S seconds after their commit: a peer still merging round k fetches a gone member's
        blobs from us, and 'not found' would cost it the round."""
        now = time.monotonic()
        recent = [r for r, t in self.commit_times.items() if now - t < KEEP_S]
        oldest = min([self.round - ROUNDS_KEPT, *recent])
        self.commit_times = {r: t for r, t in self.commit_times.items() if r >= oldest}
        return oldest

    def window(self, member_times: list[float], everyone: bool = False) -> float:
        """Seconds until the next round closes, from the cycles (`t`: fetch and merge a commit, train T steps,
        upload) that this round's members and the peers that announced themselves (e.g. after missing it) report;
        see `round_window`. With `everyone`, long enough for the slowest of them too."""
        alive = read(self.dht, alive_key(self.run))
        times = list(member_times)
        if isinstance(alive, dict):
            times += [float(v.get("t", 0.0)) for v in alive.values() if isinstance(v, dict)]
        if everyone:
            return max(self.opts.round_seconds, 1.5 * max(times, default=0.0) + 1.0)
        return round_window(times, self.opts.round_seconds)

    def evaluate(self) -> None:
        self.eval_model.load_state_dict(self.base, strict=True)
        acc, loss = evaluate(self.eval_model, self.test_set, "cpu")
        self.evaluation = {"round": self.round, "test_accuracy": acc, "test_loss": loss}

    def finish(self) -> None:
        """Tell peers the run is over, so they leave cleanly instead of waiting for rounds that never come."""
        self.finished = True
        self.publish_base()

    def drain(self, timeout: float) -> None:
        """After `finish`, stay up (at most `timeout` s) until every member of the last commit has merged it (each
        publishes its base hash for the final round), then for one more round window (and AGREE_GRACE_S), sized for the slowest live
        peer (a straggler sets no round's pace, but it must read that the run is over).

        Peers fetch client-mode members' blobs, and a vanished member's, from the coordinator only: leaving right
        after the last commit left them one round short of the final base. And a peer learns that the run is over
        only when it reads the base record after its next T local steps; a client-mode peer stores no records, so
        once we (and the peers that already left) are gone it cannot read it and retries until it gives up."""
        members = {pid for pid, st in self.peers.items() if st.last_round == self.round - 1}
        deadline = time.monotonic() + timeout
        while members and time.monotonic() < deadline:
            if members <= set(read_base_hashes(self.dht, self.run, self.round)):
                break
            time.sleep(0.5)
        # plus the matchmaking grace: a peer whose search for the last round's group outlives it reads the record then
        time.sleep(max(0.0, min(self.window([], everyone=True) + AGREE_GRACE_S + 1.0, deadline - time.monotonic())))

    def save_checkpoint(self) -> Path:
        """Checkpoint the current round (coordinator/checkpoints.py: atomic, signed, retention) and serve it."""
        latest = self.checkpoints.latest()
        if latest is not None and latest.round == self.round and latest.base_hash == self.base_hash:
            return latest.path  # nothing new since (the final save right after a scheduled one)
        saved = self.checkpoints.save(self.base, {
            "run": self.run, "spec": self.spec.model_dump(mode="json"), "spec_hash": self.spec_hash,
            "round": self.round, "base_hash": self.base_hash, "arch": self.spec.model.name,
            "kwargs": self.spec.model.kwargs, "evaluation": self.evaluation, "merges": self.merges,
            "peers": {pid: vars(st) for pid, st in self.peers.items()}, "history": self.history[-50:],
            "curve": self.curve.points(),
        }, self.key, self.owner)
        self.merges = []
        self.checkpoints_saved += 1
        self.publisher.publish(self.checkpoints)
        return saved.path

    def status(self) -> dict[str, Any]:
        """What /status.json (and the status page built on it) shows; read from HTTP threads while rounds run."""
        peers = list(self.peers.items())  # one C-level copy: run_round may add peers while we read
        with self.head_lock:
            round_id, base_hash = self.round, self.base_hash
        return {"run": self.run, "spec_hash": self.spec_hash, "round": round_id, "base_hash": base_hash,
                "coordinator": self.peer_id, "owner": fingerprint(self.owner),
                "join": f"lte-peer join --dht {self.join_addr()}",
                "peers": {pid: {"samples": st.samples, "rounds": st.rounds, "last_round": st.last_round}
                          for pid, st in peers if st.last_round >= round_id - 3},
                "leaderboard": [{"peer": pid, "samples": st.samples, "rounds": st.rounds, "last_round": st.last_round,
                                 "score": st.score_sum / st.scored if st.scored else None,
                                 "last_score": st.last_score, "rejected": st.rejected}
                                for pid, st in sorted(peers, key=lambda p: (-p[1].samples, -p[1].rounds, p[0]))[:100]],
                "spec": self.spec.model_dump(mode="json"), "curve": self.curve.points(),
                "evaluation": self.evaluation, "history": self.history[-50:],
                "checkpoints": self.checkpoints.listing()}

    def close(self) -> None:
        shutdown_node(self.members, self.blobs, dht=self.dht)


def _finite(value: Any) -> Any:
    """Scores as the commit and the summary carry them: -inf (an update that blows the loss up) becomes None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value if math.isfinite(value) else None
