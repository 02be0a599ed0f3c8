"""A training participant: trains its own LoRA head on its shard and takes part in every round it can.

Between rounds it trains T steps. In round k it announces its blobs, joins the membership agreement, waits for
the coordinator's signed commit, merges exactly the committed members (fetching their blobs from them, or from
the coordinator), and checks that its base hash equals the committed one. Whenever it falls behind or its hash
differs, it downloads the current base from the coordinator and drops its unmerged progress.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hivemind.utils import get_dht_time
from tqdm import tqdm

import lte
from lte.checkpoint import state_bytes, state_hash
from lte.config import RunSpec, spec_from_dict
from lte.errors import ConfigError
from lte.merge import apply_update
from lte.models import check_fits, create_base_model
from lte.net import GroupNotFound, NetworkError
from lte.net.access import unlisted
from lte.net.blobs import BlobService
from lte.net.node import announceable
from lte.net.membership import AGREE_GRACE_S, Membership
from lte.net.node import reconnect, shutdown_node, start_dht, visible_maddrs
from lte.net.records import owner_bound_to, publish, publish_base_hash, read_signed, read_signed_all
from lte.merge import merge_contributions
from lte.net.dense import dense_exchange
from lte.net.rounds import (BASE, CHECKPOINT, PROTOCOL_VERSION, REPLICAS, Digest, alive_key, as_dense, base_from_tensors,
                            base_key, checkpoints_key, commit_key, providers_key,
                            factor_blob_shas, fetch_contributions, local_factors, put_factors, round_dense_layers,
                            run_prefix, spec_key)
from lte.lora import Snapshot
from lte.train import HeadTrainer
from lte.validate import Rejected, update_norm
from lte.quant import WIRE_FORMATS
from lte.wire import Layout, pack_factors, pack_replicas, unpack_replicas

from peer.training_data import training_data
from peer.metrics import PeerMetrics


RETRY_S = 60.0
# At most this many rounds that went by are followed commit by commit, keeping our progress (the coordinator keeps
# members' blobs about as long: coordinator.service.ROUNDS_KEPT); a longer gap is closed with one base download.
MAX_FOLLOWED = 3
STALE_BASE_S = 5.0  # how long a base record older than our base is read again before we believe it
# A pipelined peer announces its snapshot this long before its round closes (plus its upload time in client mode):
# matchmaking must find the round's group before it closes. Announcing early costs no training (the peer trains on),
# only a few steps move to its next contribution; at 1 s an honest peer on a loaded 2-core machine missed a group.
LEAD_S = 2.0
# A pipelined peer contributes at least T steps (lte.merge_every) and trains at most MAX_ROUND_STEPS x T steps past
# its last snapshot: contributions of comparable size (the norm bound and the loss scoring compare them; at 4 T the
# test model's honest heads overfit their shards and scored below the scoring floor), and a learning-rate schedule
# that no peer runs through while a long round is in flight. Rounds last about 1.5 x the fleet's longest cycle + 1 s
# (coordinator.service.round_window) plus the commit: at 2 T the peers of a loopback run idled 30 % of every round
# (benchmarks/utilization.py). Where rounds take longer than 3 T steps (a slow link, or a --round-seconds far above
# the fleet's T-step time) the peer waits: the network is then the bottleneck.
MAX_ROUND_STEPS = 3
# How long a leaving peer lets the round in flight end once its node is down (its network calls then fail at once):
# interpreter shutdown under a thread still inside torch aborts the process ("terminate called without an active
# exception", exit -6 instead of the SIGTERM's 143; CI's churn test).
FLIGHT_EXIT_S = 5.0
# float64 sums over the same bytes may differ in the last bits between machines; a norm this close to the bound
# was accepted by the coordinator's own computation
NORM_TOLERANCE = 1e-9


@dataclass
class Landing:
    """Round k's merged base, computed from its commit (beside training when rounds are pipelined), to be adopted
    between two steps. `sent`: our factors' blob when the commit merged us; `mean_loss`: None when we announced
    nothing for the round."""
    k: int
    commit: dict[str, Any]
    state: dict[str, torch.Tensor]
    data: bytes  # the serialized base: its hash must be the commit's
    close: float
    traffic_before: dict[str, int]
    mean_loss: float | None
    sent: str | None = None
    seconds: float = 0.0  # fetching and merging it
    snapshot: Snapshot | None = None  # our merged snapshot: its progress leaves our head (pipelined)
    snapshot_f: str | None = None  # the blob of its factors: our V from now on
    rejected: bool = False  # the commit rejected our snapshot: all our progress is dropped (see Peer._fly)


class Flight:
    """The round in flight on a pipelined peer: run `work` on a daemon thread (a SIGTERM must not wait for a
    fetch) and hand its result, or its exception, to the training loop."""

    def __init__(self, k: int, sent: Digest | None, work: Callable[[], Landing | None]):
        self.k, self.sent, self._future = k, sent, Future()

        def run() -> None:
            try:
                self._future.set_result(work())
            except BaseException as err:  # noqa: BLE001 (re-raised where the training loop lands the round)
                self._future.set_exception(err)

        self._thread = threading.Thread(target=run, name=f"round-{k}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Landing | None:
        return self._future.result()


class RunFinished(Exception):
    """The coordinator has ended the run."""


@dataclass
class PeerOptions:
    dht: str
    dataset: str | None = None
    data: str | None = None
    shard: tuple[int, int] | None = None  # of --data or built-in data; None: 0/1 (the run's shards need none)
    cache_dir: str | None = None  # where the run's shards are kept; None: peer.shards.default_cache_dir()
    batch_size: int | None = None
    device: str = "cpu"  # the CLI resolves `auto`
    base_dtype: str = "fp32"  # the frozen base on the device: fp32, bf16 or int8 (an fp32 master stays in host memory)
    name: str | None = None
    max_rounds: int | None = None
    client_mode: bool = False
    announce_maddrs: tuple[str, ...] = ()
    identity: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    upnp: bool = False
    progress: bool = True
    join_timeout: float = 30.0
    # "pipelined" (train on while rounds are merged), "sync" (train T steps, then wait for the round: runs with
    # lte.reset always use it) or "lockstep" (deterministic, for replays)
    schedule: str = "pipelined"


def find_run(dht: Any, coordinator: str, timeout: float) -> tuple[bytes, dict[str, Any]]:
    """The run record of the coordinator we were pointed at (its peer id is in the --dht address): its owner tag
    (the key every later record of the run must be signed with) and its value (spec, settings).

    Anyone can store a well-signed record under the run's key with their own key, so a record counts only if it
    carries a proof, signed with the key behind the coordinator's peer id, that its owner tag is the coordinator's
    (`lte.net.records.owner_bound_to`). That needs no answer from the coordinator: downloads work without it."""
    deadline = time.monotonic() + timeout
    while True:
        for r in read_signed_all(dht, spec_key(coordinator)).values():
            value = r.value if isinstance(r.value, dict) else {}
            if value.get("coordinator") == coordinator and owner_bound_to(coordinator, r.owner, value.get("binding")):
                return r.owner, value
        if time.monotonic() > deadline:
            raise NetworkError(f"no run record from coordinator {coordinator} within {timeout:.0f} s")
        time.sleep(0.5)


class Peer:
    def __init__(self, opts: PeerOptions, log: Callable[[dict[str, Any]], None], metrics: PeerMetrics | None = None):
        self.opts, self.log = opts, log
        self.metrics = metrics or PeerMetrics()
        self.dht = self.blobs = self.members = None
        self.last_flight: Flight | None = None  # for close() only: the training loop owns the round in flight
        self.run_over = False  # a base record we read said the run is finished
        try:
            self.dht = start_dht([opts.dht], host=opts.host, port=opts.port, client_mode=opts.client_mode,
                                 announce_maddrs=list(opts.announce_maddrs) or None, identity_path=opts.identity,
                                 upnp=opts.upnp)
            self.peer_id = self.dht.peer_id.to_base58()
            self.coordinator = opts.dht.rsplit("/p2p/", 1)[-1]
            self.owner, record = find_run(self.dht, self.coordinator, opts.join_timeout)
            self.spec: RunSpec = self._check_spec(record)
            self.allow = record.get("allow")
            self._check_allowed()
            self.run = self.spec.run
            self.wire = record.get("wire", "raw")
            if self.wire not in WIRE_FORMATS:
                raise ConfigError(f"run sends factors as {self.wire!r}, which this lte-peer cannot code "
                                  f"(it knows {', '.join(WIRE_FORMATS)}): upgrade lte-network")
            self.paths = record.get("paths", "auto")
            self.fetch_timeout = float(record.get("fetch_timeout", 20.0))
            self.blobs = self._blob_service()
            self.maddrs: list[str] = [] if opts.client_mode else announceable(visible_maddrs(self.dht), opts.dht)
            self.client_mode = opts.client_mode or self._switch_to_client_mode_if_unreachable()
            self.members = Membership(self.dht, prefix=run_prefix(self.run), client_mode=self.client_mode)
            batch = opts.batch_size or self.spec.data.batch_size // self.spec.lte.heads
            # the run's shards (fetched, cached, served: peer/training_data.py), or --data / built-in data
            train_set, stream, what = training_data(self, record, batch)
            base = create_base_model(self.spec.model)
            check_fits(base, train_set, what)
            self.trainer = HeadTrainer(self.spec, base, self.peer_id, train_set, batch, opts.device,
                                       opts.base_dtype, stream=stream)
            self.layout = Layout.of(self.trainer.model)
            self.metrics.joined(self.run, self.spec.spec_hash(), lambda: self.blobs.traffic if self.blobs else None)
            self.round, self.prev_sha, self.samples, self.losses, self.train_seconds = -1, "", 0, [], 0.0
            # the rest of a round's cycle on this peer: fetching and merging a commit, uploading our blobs (client mode)
            self.apply_seconds = self.push_seconds = 0.0
            # pipelined rounds (run_pipelined): time inside training steps, their mean, steps since our last snapshot
            self.trained_seconds, self.step_seconds, self.timed_steps, self.steps_since_sent = 0.0, 0.0, 0, 0
            self.sent_losses = 0  # how many of self.losses the snapshot in flight holds
            self.clock = (-1, 0)  # (round, steps on its base): where a pipelined peer is in the learning-rate schedule
            self.open_rec: dict[str, Any] | None = None  # the base record of the round we hold (pipelined)
            self.read_at = 0.0  # when the pipelined loop may read the base record again
            self.pipelined = opts.schedule != "sync" and not self.spec.lte.reset
            # when training next reads the base record: after our round's close, to follow rounds that went by
            self.check_at, self.follow_seconds = 0.0, 0.0
            self.announced: tuple[int, list[Digest]] = (-1, [])  # (round, digests we announced for it)
            self.serving: tuple[str, ...] = ()  # blobs of the checkpoint we serve (model file, meta.json)
            self.recent_bases: dict[int, bytes] = {}  # serialized bases of the last two merged rounds
            self.resync()
            self.log({"event": "joined", "round": self.round, "peer_id": self.peer_id, "maddrs": self.maddrs,
                      "device": opts.device})
        except BaseException:
            self.close()  # a half-started node must not leave DHT or p2pd processes behind
            raise

    # ----- joining ------------------------------------------------------------------------------------------
    def _check_spec(self, record: dict[str, Any]) -> RunSpec:
        if record.get("protocol") != PROTOCOL_VERSION:
            raise ConfigError(f"run speaks protocol {record.get('protocol')}, this lte-peer speaks {PROTOCOL_VERSION}: "
                              "upgrade lte-network")
        if str(record.get("version", "")).split(".")[:2] != lte.__version__.split(".")[:2]:
            raise ConfigError(f"run needs lte-network {record.get('version')}, this is {lte.__version__}")
        spec = spec_from_dict(record.get("spec", {}), "run spec")
        if spec.spec_hash() != record.get("spec_hash"):
            raise ConfigError("run spec does not match its published hash: refusing it")
        return spec

    def _check_allowed(self) -> None:
        """A closed run that does not list us would never merge our work: say so now, in one line."""
        if unlisted([self.peer_id], self.allow):
            raise ConfigError(f"run {self.spec.run} is closed and does not list this peer ({self.peer_id}): send that "
                              "id to the run's organizer, and keep --identity FILE so that it stays the same")

    def _switch_to_client_mode_if_unreachable(self) -> bool:
        """Detect NAT: ask the coordinator to open a new connection to the addresses we announce. If none opens,
        nobody could fetch our blobs, so restart the node in client mode (we push them to the coordinator instead).
        Returns whether we are now in client mode."""
        addrs = announceable(visible_maddrs(self.dht), self.opts.dht)
        try:
            reachable = self.blobs.dial_back(self.coordinator, addrs)
        except NetworkError as err:  # cannot tell: stay a server, as asked
            self.log({"event": "reachability_unknown", "error": str(err)})
            return False
        if reachable:
            self.maddrs = reachable  # what members dial us at: only the addresses that worked
            return False
        self.log({"event": "client_mode_detected", "unreachable": addrs})
        shutdown_node(self.blobs, dht=self.dht)
        self.dht = self.blobs = None
        self.dht = start_dht([self.opts.dht], host=self.opts.host, port=0, client_mode=True,
                             identity_path=self.opts.identity, upnp=self.opts.upnp)
        self.peer_id = self.dht.peer_id.to_base58()  # a new one unless --identity keeps it
        self._check_allowed()
        self.blobs = self._blob_service()
        self.maddrs = []
        return True

    def _blob_service(self) -> BlobService:
        blobs = BlobService(self.dht, namespace=run_prefix(self.run))
        blobs.learn_addresses({self.coordinator: [self.opts.dht]})  # dialled where we were told it listens
        return blobs

    def _data_spec(self):
        upd: dict[str, Any] = {}
        if self.opts.data:
            upd = {"dataset": self.opts.dataset or "imagefolder", "path": self.opts.data}
        elif self.opts.dataset:
            upd = {"dataset": self.opts.dataset}
        return self.spec.data.model_copy(update=upd)

    # ----- base sync ----------------------------------------------------------------------------------------
    def _base_record(self, fresh: bool = False) -> dict[str, Any]:
        """The coordinator's signed base record. With `fresh`, one older than the base we hold is read again for up
        to STALE_BASE_S: the coordinator publishes it just after the commit we merged, and a peer whose merge found
        its blobs prefetched reads the DHT before it arrives (CI: a resync to the very base it held)."""
        deadline = time.monotonic() + (STALE_BASE_S if fresh else 0.0)
        while True:
            rec = read_signed(self.dht, base_key(self.run), self.owner)
            if rec is None or not isinstance(rec.value, dict):
                raise NetworkError("the coordinator's base record is not readable")
            # Remembered: once the coordinator has left, a DHT read may return an older copy of the record (a
            # client-mode peer reads its own cache), and a peer that missed the end kept following a closed round.
            self.run_over = self.run_over or bool(rec.value.get("finished"))
            if int(rec.value.get("round", -1)) >= self.round or time.monotonic() >= deadline:
                return rec.value
            time.sleep(0.2)

    def _put_own_factors(self, round_id: int) -> str:
        """Store the live factors (per-layer blobs and their manifest); returns the manifest's address."""
        return put_factors(self.blobs, self.layout, pack_factors(self.trainer.model, self.layout), round_id, self.wire)

    def resync(self) -> None:
        """Download the current base from the coordinator; unmerged progress is dropped."""
        reconnect(self.dht, self.opts.dht)  # out of step: the coordinator may have restarted, make sure we see it
        rec = self._base_record()
        # A whole base: 85 MB for ViT-S, minutes on a slow home link and longer when peers join together. It may take
        # as long as it needs while bytes keep coming (three ViT-S peers joining over 20 Mbit/s missed a 60-s deadline).
        with tqdm(desc="base", unit="B", unit_scale=True, disable=not self.opts.progress, leave=False) as bar:
            def progress(n: int, total: int) -> None:
                bar.total = total
                bar.update(n)

            tensors = self.blobs.fetch(self.coordinator, rec["blob"], kind=BASE, stall_timeout=self.fetch_timeout,
                                       progress=progress)
        state = base_from_tensors(self.trainer.model.state_keys, tensors)
        if state_hash(state) != rec["hash"]:
            raise NetworkError("downloaded base does not match the coordinator's signed hash")
        self._set_base(state, int(rec["round"]), None)
        self.base_hash = rec["hash"]
        self.metrics.resynced(self.round)
        self.log({"event": "resync", "round": self.round, "base_hash": rec["hash"]})

    def _set_base(self, state, round_id: int, sent_sha: str | None, keep_progress: bool = False,
                  snapshot: Snapshot | None = None) -> None:
        """Adopt a base. V becomes the factors in blob `sent_sha` (just merged), or a fresh blob of the live ones;
        with `keep_progress`, V and our replicas' offsets from the base stay (design notes §5: a left-out head);
        with `snapshot` (pipelined: merged from it), V <- its factors and we keep our progress since it."""
        model = self.trainer.model
        # The adopted base's replicas: training moves the model's copy, and a round that merges nobody must give
        # back exactly this base (the commit's hash), not our trained replicas.
        weights = {f"{l}.weight" for l in self.layout.layers}
        self.base_replicas = {k: v.detach().clone() for k, v in state.items() if k not in weights}
        if snapshot is not None:
            model.load_base(state, snapshots=[snapshot])
            self.prev_sha, self.round = sent_sha, round_id
            self.samples = max(0, self.samples - int(snapshot.samples))  # what we trained since it stays ours
            self.losses = self.losses[self.sent_losses:]
            return
        if keep_progress:
            model.load_base(state, snapshots=[])
            if self.prev_sha:  # V's blobs are served to this round's fetchers: they must outlive drop_rounds_before
                self.blobs.store.keep_until(factor_blob_shas(self.blobs, self.layout, self.prev_sha), round_id)
            self.round = round_id
            return
        if self.spec.lte.reset:
            model.load_base(state)
            self.prev_sha = ""
        else:
            if sent_sha is None and all(torch.count_nonzero(l.lora_B) == 0 for l in model.layers.values()):
                sent_sha = ""  # V = B A = 0: nothing to send
            elif sent_sha is None:
                sent_sha = self._put_own_factors(round_id)
            model.load_base(state, local_factors(self.blobs, self.layout, sent_sha) if sent_sha else None)
            self.prev_sha = sent_sha
        # progress dropped: the pipelined cap on steps per contribution (MAX_ROUND_STEPS) counts from here
        self.round, self.samples, self.losses, self.steps_since_sent = round_id, 0, [], 0

    # ----- rounds -------------------------------------------------------------------------------------------
    def train_round(self) -> None:
        self._phase("train", self.round)
        t0, self.follow_seconds = time.perf_counter(), 0.0
        n, loss = self.trainer.train_steps(self.spec.lte.merge_every, self.opts.progress, f"round {self.round}",
                                           between=self._follow_passed_rounds)
        self.train_seconds = time.perf_counter() - t0 - self.follow_seconds
        self.trained_seconds += self.train_seconds
        self.metrics.busy(self.train_seconds)
        self.samples += n
        self.losses.append(loss)
        self.metrics.trained(n, self.spec.lte.merge_every, self.train_seconds, loss)

    def join_round(self) -> bool:
        """Take part in round `self.round`. Returns True when it merged, False when it had to resync."""
        rec = self._open_round()
        if rec is None:
            return False
        k = self.round  # after `_open_round`: it may have followed rounds that went by
        announced = self._announce(k)
        self._push(announced)
        # every digest we announce for round k: a group can form without our matchmaking hearing of it (CI saw it
        # close seconds before its scheduled time), and its commit then names one of them (`_catch_up`)
        self.announced = self.announced if self.announced[0] == k else (k, [])
        self.announced[1].append(announced)
        close = float(rec["close"])
        now = get_dht_time()
        self._phase("agree", k)
        try:
            gathered = self.members.agree(k, announced.to_dict(), deadline_s=max(1.0, close - now) + AGREE_GRACE_S,
                                          min_size=int(rec.get("min_size", 2)), scheduled_time=max(close, now + 0.5))
        except GroupNotFound:
            gathered = {}
        if self.coordinator not in gathered:
            # No round happened for us. If the base has not moved on, keep the progress and try again after more
            # local steps (the samples count grows, so the merge weights it fairly); otherwise catch up.
            self._resync_unless_holding(k)
            return False
        self._phase("fetch", k, members=len(gathered) - 1)  # a member now: the coordinator fetches our blobs
        before = dict(self.blobs.traffic.received)  # the round's bytes include what the prefetch brings
        self._prefetch(k, gathered, announced)
        commit = self._wait_commit(k)
        if commit is None:
            # The coordinator died or restarted mid-round. While the base record still names the base we hold, keep
            # the progress and train on, as when no group formed; a resync would drop it, and with the coordinator
            # down its download blocks for a minute instead of training.
            self._resync_unless_holding(k)
            return False
        self._phase("merge", k, member=self.peer_id in commit["members"])
        return self._apply_commit(k, commit, announced.f, announced.loss, close, traffic_before=before)

    def _prefetch(self, k: int, gathered: dict[str, Any], announced: Digest) -> None:
        """Fetch the other members' blobs of round k in the background while the coordinator checks and commits:
        blobs are content-addressed, so what arrives now is what the merge would fetch after the commit, and the
        merge then finds it held, or waits for its transfer in flight (BlobService.fetch). Best effort: a member
        the commit leaves out costs its bytes, and anything that fails here is fetched again, or refused, by the
        merge."""
        def fetch() -> None:
            try:
                members = {pid: Digest.from_dict(d) for pid, d in gathered.items() if pid != self.peer_id}
                members = {pid: d for pid, d in members.items() if not d.coordinator}
                sources = {pid: [self.coordinator] if d.client else [pid, self.coordinator] for pid, d in members.items()}
                dense = round_dense_layers(self.layout, {**members, self.peer_id: announced}, self.paths)
                layers = [l for l in self.layout.layers if l not in dense]
                fetch_contributions(self.blobs, self.layout, members, sources, k, self.fetch_timeout, layers)
            except Exception:  # noqa: BLE001 (best effort, see above)
                pass

        threading.Thread(target=fetch, name=f"prefetch-{k}", daemon=True).start()

    def _follow_passed_rounds(self) -> None:
        """Between two training steps: once the close of our round has passed, read the base record (at most about
        once a round) and merge, as a non-member, every round that committed without us, keeping our progress.

        This is how no peer waits for a slower one: the coordinator's windows follow the fleet's pace, not the
        slowest peer's (coordinator.service.round_window), so a slow peer's T steps span several rounds. It
        follows their commits as they come and contributes its T steps, with every sample since its last merge, to
        the first round it reaches, on the base every member shares."""
        if self.spec.lte.reset or get_dht_time() < self.check_at:
            return
        t0 = time.perf_counter()
        try:
            rec = self._base_record()
        except NetworkError:  # a DHT hiccup must not cost the steps we are training: look again in a second
            self.check_at = get_dht_time() + 1.0
            return
        if rec.get("finished"):
            raise RunFinished()
        if int(rec["round"]) > self.round:
            self._catch_up(rec)
        # the next look: after this round's close, and no sooner than a second from now (a commit is on its way)
        self.check_at = max(float(rec["close"]), get_dht_time() + 1.0) if int(rec["round"]) == self.round else 0.0
        self.follow_seconds += time.perf_counter() - t0

    def _catch_up(self, rec: dict[str, Any]) -> None:
        """Merge the commits from our round up to the base record's `rec` as a non-member, keeping the progress we
        have not contributed (the reset-less rule makes it valid on the new base: LTEModel.load_base without a
        snapshot). A commit that merged us although our matchmaking failed is merged as a member, from the digest
        we announced. Any commit we cannot read or merge ends it with a resync, which drops the progress, and so
        does a gap of more than MAX_FOLLOWED rounds (their blobs are gone, and one base download is cheaper)."""
        target = int(rec["round"])
        if target - self.round > MAX_FOLLOWED:
            self.resync()
            return
        while self.round < target:
            k = self.round
            commit = read_signed(self.dht, commit_key(self.run, k), self.owner)
            if (commit is None or not isinstance(commit.value, dict) or commit.value.get("round") != k
                    or commit.value.get("epoch") != rec.get("epoch")):
                self.resync()
                return
            ours = commit.value.get("members", {}).get(self.peer_id)
            if ours is not None:  # merged although our matchmaking failed: merge it as the member we are
                sent = [d for d in self.announced[1] if self.announced[0] == k and d.f == ours.get("f")]
                if not sent:
                    self.resync()
                    return
                self._phase("merge", k, member=True, late=True)
                since = self.samples - sent[0].n  # trained after that snapshot: still in B A - V, so still ours
                if not self._apply_commit(k, commit.value, sent[0].f, sent[0].loss, get_dht_time(), late=True):
                    return  # it resynced
                self.samples = max(0, since)
                continue
            self._phase("follow", k, training=True)
            if not self._apply_commit(k, commit.value, None, None, get_dht_time(), keep_progress=True):
                return  # it resynced

    def _resync_unless_holding(self, k: int) -> None:
        """After a round that gave us no commit: keep our base and progress while the base record still names the
        base we hold (round k, same hash), or follow the rounds that went by keeping the progress; download the
        current base only when neither works.

        Dials the coordinator first: no commit is what being cut off looks like, and hivemind's DHT forgets every
        node that did not answer once, after which it reads only its own stale copies of the records (a peer whose
        link was down for 30 s followed a round that had long closed, again and again, and never learnt of newer
        ones)."""
        if self.run_over:
            raise RunFinished()
        reconnect(self.dht, self.opts.dht)
        rec = self._base_record()
        if int(rec["round"]) > k and self.samples and not self.spec.lte.reset:
            self._catch_up(rec)
        elif int(rec["round"]) != k or rec["hash"] != self.base_hash:
            self.resync()

    def _announce(self, k: int) -> Digest:
        """Store this round's blobs (our snapshot: what the commit will account for) and the digest that announces
        them to the round's members."""
        f_sha = self._put_own_factors(k)
        r_sha = self.blobs.put(pack_replicas(self.trainer.model, self.layout), kind=REPLICAS, round_id=k)
        return Digest(f=f_sha, r=r_sha, v=self.prev_sha, n=self.samples, loss=sum(self.losses) / max(1, len(self.losses)),
                      t=self.cycle_seconds(), spec=self.spec.spec_hash(), client=self.client_mode, k=k,
                      a=tuple(self.maddrs))

    def _push(self, d: Digest) -> None:
        """In client mode nobody can reach us: upload the blobs of `d` (and of its V) for the coordinator to serve."""
        if not self.client_mode:
            return
        t0 = time.perf_counter()
        shas = factor_blob_shas(self.blobs, self.layout, d.f) + [d.r]
        if d.v:
            shas += factor_blob_shas(self.blobs, self.layout, d.v)
        for sha in shas:
            self.blobs.push(self.coordinator, sha, timeout=self.fetch_timeout)
        self.push_seconds = time.perf_counter() - t0

    def cycle_seconds(self) -> float:
        """How long this peer needs from a commit to its next announcement: merge the commit, train T steps, upload
        (client mode). The coordinator sizes round windows from it: a window that counted the training alone left
        peers on slow links following rounds instead of training (seen in the network lab at 20 Mbit/s).
        0 (unknown) until T steps were timed: a joining peer's merge alone would pull the fleet's median down."""
        if not self.train_seconds:
            return 0.0
        if self.pipelined:
            # The merge runs beside training, but the next announcement needs both: T steps since the snapshot, and
            # the commit fetched and merged. Counting the training alone gave 2-s windows that a peer merging for
            # 1-3 s on a loaded machine entered with under a second left, and it missed groups (CI).
            return max(self.train_seconds, self.apply_seconds) + self.push_seconds
        return self.apply_seconds + self.train_seconds + self.push_seconds

    def _open_round(self) -> dict[str, Any] | None:
        """The base record if round `self.round` is still open to us; None after catching up with a newer base."""
        rec = self._base_record(fresh=True)
        if rec.get("finished"):
            raise RunFinished()
        # Announce our training time before anything else: a peer that keeps arriving after its round closed
        # (a late joiner, a slow machine) is exactly the one the coordinator must widen the window for.
        publish(self.dht, alive_key(self.run), {"t": self.cycle_seconds()}, ttl=60, subkey=self.peer_id, wait=False)
        if int(rec["round"]) > self.round and self.samples and not self.spec.lte.reset:
            self._catch_up(rec)  # a slow peer: its steps go into this round, on the base everyone shares
        if int(rec["round"]) != self.round:
            self.resync()
            return None
        self._serve_checkpoint()
        return rec

    def _serve_checkpoint(self) -> None:
        """Serve the newest checkpoint when our base is its base, so users can download it from us too, even when
        the coordinator is gone. The model file's bytes are our base serialized (its hash is the base hash every
        participant agrees on), so we only fetch the small signed meta.json. Costs up to three serialized bases in
        memory: the last two merged (the coordinator lists a checkpoint a moment after its commit) and the served one."""
        if self.client_mode or not self.recent_bases:
            return  # nobody could fetch it from us, or we merged nothing yet
        rec = read_signed(self.dht, checkpoints_key(self.run), self.owner)
        entries = rec.value.get("checkpoints") if rec is not None and isinstance(rec.value, dict) else None
        entries = [e for e in entries or [] if isinstance(e, dict) and e.get("round") in self.recent_bases]
        if not entries:
            return
        entry = max(entries, key=lambda e: e["round"])
        data = self.recent_bases[entry["round"]]
        if entry.get("model") in self.serving or hashlib.sha256(data).hexdigest() != entry.get("hash"):
            return
        try:
            self.blobs.fetch(self.coordinator, entry["meta"], kind=CHECKPOINT, timeout=self.fetch_timeout, keep=True)
        except NetworkError:
            return  # try again next round
        model = self.blobs.put([torch.frombuffer(bytearray(data), dtype=torch.uint8)], kind=CHECKPOINT)
        for sha in self.serving:
            self.blobs.store.remove(sha)
        self.serving = (model, entry["meta"])
        publish(self.dht, providers_key(self.run, entry["round"]), {"m": model}, ttl=3600, subkey=self.peer_id)
        self.log({"event": "serving_checkpoint", "round": entry["round"], "model": model})

    def follow_round(self) -> bool:
        """Catch up without training: merge round k's commit as a non-member. Right after a resync the current
        round's window has usually partly gone by; T local steps would then finish after it closes and be thrown
        away at the next resync, over and over. Following the commit instead lands us at the start of the next
        window, like everyone else (the issue's "contributes nothing in its first round")."""
        k = self.round
        rec = self._open_round()
        if rec is None:
            return False
        self._phase("follow", k)
        close = float(rec["close"])
        commit = self._wait_commit(k, close - get_dht_time())
        if commit is None:  # no round formed: train for the next window (as in join_round)
            self._resync_unless_holding(k)
            return False
        self._phase("merge", k, member=False)
        return self._apply_commit(k, commit, None, None, close)

    def _phase(self, phase: str, round_id: int, **detail: Any) -> None:
        """Say which part of a round starts now (train, agree, fetch, merge; follow: waiting for a commit to merge
        without having trained): what an operator reads to see where a
        peer hangs, and what fault tests time their signals by."""
        self.log({"event": "phase", "phase": phase, "round": round_id, **detail})

    def _behind_schedule(self) -> bool:
        """True when we hold no unmerged steps (just resynced or merged), T steps plus our upload would end after
        the current round's window closes, but would fit in a whole window: waiting for the next one gets our steps
        into it sooner. A peer too slow for any window trains on (its steps go into a later round)."""
        if self.samples or not self.train_seconds:
            return False
        rec = self._base_record()
        if int(rec["round"]) < self.round:  # not yet published after our merge: it cannot tell the window; train
            return False
        needed = 1.1 * (self.train_seconds + self.push_seconds)
        return float(rec["close"]) - get_dht_time() < needed <= float(rec.get("window", float("inf")))

    def _apply_commit(self, k: int, commit: dict[str, Any], f_sha: str | None, mean_loss: float | None,
                      close: float, keep_progress: bool = False, traffic_before: dict[str, int] | None = None,
                      late: bool = False) -> bool:
        """Merge the committed members of round k into our base (our own factors are blob `f_sha` when we
        contributed) and check the result against the committed hash. With `keep_progress` (a non-member that
        trained on through the round) our unmerged steps and samples stay for our next contribution."""
        before = traffic_before if traffic_before is not None else dict(self.blobs.traffic.received)
        t_merge = time.perf_counter()
        try:
            state = self._merged_state(k, commit, f_sha, exchange=not late)
        except Rejected as err:
            self._refuse(k, err)
            return False
        member = self.peer_id in commit["members"]
        landed = self._adopt(Landing(k, commit, state, state_bytes(state), close, before, mean_loss,
                                     sent=f_sha if member else None, seconds=time.perf_counter() - t_merge),
                             keep_progress=keep_progress and not member)
        self.apply_seconds = time.perf_counter() - t_merge
        return landed

    def _refuse(self, k: int, err: Rejected) -> None:
        """The coordinator committed what our own checks refuse: never merge it."""
        self.metrics.reject("commit_invalid")
        self.log({"event": "commit_invalid", "round": k, "error": str(err)})
        self.resync()

    def _merged_state(self, k: int, commit: dict[str, Any], f_sha: str | None, exchange: bool) -> dict[str, Any]:
        """The base after round k's commit: ours plus the committed members' update, fetched and checked (raises
        Rejected for a commit our own checks refuse). Reads the base, never changes it: it runs beside training."""
        members = {pid: Digest.from_dict(d) for pid, d in commit["members"].items()}
        state = self.trainer.model.base_state_dict() | self.base_replicas
        if not members:
            return state
        if unlisted(members, self.allow):
            raise Rejected("unauthorized", f"the commit merges unlisted peers {unlisted(members, self.allow)}")
        sources = {pid: ([self.coordinator] if d.client else [pid, self.coordinator]) for pid, d in members.items()}
        return self._merge_committed(k, members, sources, f_sha, state, float(commit.get("bound", "inf")),
                                     exchange=exchange)

    def _adopt(self, landing: "Landing", keep_progress: bool, snapshot: Snapshot | None = None) -> bool:
        """Make round `landing.k`'s merged base ours, check it against the commit's hash, publish and log it.
        With `snapshot` (pipelined), we were merged from it and keep our progress since; with `keep_progress` we
        were left out and keep all of it. Returns False when the hash differs (we then resync)."""
        k, commit, state, data = landing.k, landing.commit, landing.state, landing.data
        members = commit["members"]
        t_set = time.perf_counter()
        self._set_base(state, k + 1, landing.snapshot_f if snapshot is not None else landing.sent,
                       keep_progress=keep_progress, snapshot=snapshot)
        contributed = members[self.peer_id]["n"] if landing.sent is not None else 0
        settled = int(snapshot.samples) if snapshot is not None else 0  # what left our head (pipelined)
        self.metrics.merged(k + 1, len(members), contributed=landing.sent is not None,
                            samples=settled if snapshot is not None or keep_progress else None)
        h = self.base_hash = hashlib.sha256(data).hexdigest()
        # Where a round's time goes on this peer, after the commit: fetch and merge, load the base, hash it.
        parts = {"fetch_merge": landing.seconds, "set_base": time.perf_counter() - t_set}
        if not self.client_mode:  # the coordinator lists a round's checkpoint a moment after its commit
            self.recent_bases = {r: b for r, b in self.recent_bases.items() if r == k} | {k + 1: data}
        if h != commit["hash"]:
            self.metrics.reject("hash_mismatch")
            self.log({"event": "hash_mismatch", "round": k + 1, "ours": h, "committed": commit["hash"]})
            self.resync()
            return False
        publish_base_hash(self.dht, self.run, k + 1, self.peer_id, h, wait=False)
        received = {kind: v - landing.traffic_before.get(kind, 0) for kind, v in self.blobs.traffic.received.items()}
        rejected = commit.get("rejected", {}).get(self.peer_id)
        if rejected and landing.mean_loss is not None:
            self.log({"event": "contribution_rejected", "round": k, "reason": rejected})
        self.log({"event": "round", "round": k + 1, "merged": self.peer_id in members, "peers": len(members),
                  "followed": landing.mean_loss is None, "latency_s": get_dht_time() - landing.close, "apply_s": parts,
                  "samples": contributed, "loss": landing.mean_loss, "base_hash": h, "bytes_received": received,
                  "bytes_sent_total": dict(self.blobs.traffic.sent), "train_s_total": self.trained_seconds,
                  "steps_total": self.trainer.steps})
        self.blobs.store.drop_rounds_before(k - 1)
        return True

    def _merge_committed(self, k: int, members: dict[str, Digest], sources: dict[str, list[str]], f_sha: str | None,
                         state: dict[str, torch.Tensor], bound: float, exchange: bool = True) -> dict[str, torch.Tensor]:
        """The base after round k: factor-path layers and replicas from the members' blobs, dense-path layers by
        owner-computes reduce (falling back to factors, which give the same bytes, if any owner fails).

        Every fetched contribution passes the same checks as at the coordinator (lte/validate.py; raises Rejected):
        fetch_contributions checks the tensors, and here the update norm against the committed bound."""
        round_dense = round_dense_layers(self.layout, members, self.paths)
        # a non-member takes no part in the exchange, nor does a member that learns of its round from the commit
        dense = round_dense if self.peer_id in members and exchange else []
        factor_layers = [l for l in self.layout.layers if l not in dense]
        contributions = fetch_contributions(self.blobs, self.layout, members, sources, k, self.fetch_timeout,
                                            factor_layers)
        for c in contributions:
            norm = update_norm(c, state)
            if norm > bound * (1 + NORM_TOLERANCE):
                raise Rejected("norm_outlier", f"committed member {c.head_id} has update norm {norm:.6g} > {bound:.6g}")
        old = dict(state)
        # A non-member merges the dense-path layers from factors too, but as the float32 deltas the coordinator and
        # the members merged them from: float64 products straight from the factors would differ in the last bits.
        contributions = [as_dense(c, [l for l in round_dense if l not in dense]) for c in contributions]
        # lte.round_samples: the fixed denominator of the weights, as the coordinator merges (lte/merge.py)
        apply_update(state, merge_contributions(contributions, self.spec.lte.scale, self.spec.lte.round_samples, old))
        if dense:
            try:
                own = local_factors(self.blobs, self.layout, f_sha)
                prev = local_factors(self.blobs, self.layout, self.prev_sha) if self.prev_sha else None
                state.update(dense_exchange(self.dht, self.blobs, self.run, k, self.peer_id, members, own, prev, old,
                                            dense, self.spec.lte.scale, self.fetch_timeout,
                                            self.spec.lte.round_samples))
            except NetworkError as err:
                self.log({"event": "dense_fallback", "round": k, "error": str(err)})
                again = fetch_contributions(self.blobs, self.layout, members, sources, k, self.fetch_timeout, [],
                                            dense, replicas=False)
                apply_update(state, merge_contributions(again, self.spec.lte.scale, self.spec.lte.round_samples, old))
        return state

    def _run_finished(self) -> bool:
        try:
            return bool(self._base_record().get("finished"))
        except NetworkError:
            return False

    def _wait_commit(self, k: int, until_close_s: float = 0.0, opened: dict[str, Any] | None = None,
                     grouped: bool = False) -> dict[str, Any] | None:
        """Round k's commit, or None once none can come. `opened`: the base record the round was joined on (a
        pipelined flight); without it, the record as read now. `grouped`: our group holds the coordinator, so a new
        window for round k is the one our group formed in, not a sign that it failed: a flight that took off just
        before the coordinator reopened the window, and joined it, gave up on the commit that merged it (CI: it then
        announced a second snapshot for the round, and resynced when the commit named the first)."""
        deadline = time.monotonic() + max(0.0, until_close_s) + self.fetch_timeout + 10.0
        # A coordinator resumed from an older checkpoint commits round k again: only its current life's commit counts.
        # And once the base record shows a new life, or a new window for round k, no commit is coming for ours.
        # Compared with the record the round was joined on, at once: read after a failed agreement, the record
        # already holds the new window, and a flight that waited for the one after it arrived too late for every
        # window (a 3-peer lab run formed no group in 6 minutes).
        base = opened if opened is not None else self._base_record()
        check_base_at = time.monotonic() + (0.0 if opened is not None else 2.0)
        while time.monotonic() < deadline:
            rec = read_signed(self.dht, commit_key(self.run, k), self.owner)
            if (rec is not None and isinstance(rec.value, dict) and rec.value.get("round") == k
                    and rec.value.get("epoch") == base.get("epoch")):
                return rec.value
            if self.run_over:  # the last round's commit is published before the record that ends the run
                return None
            if time.monotonic() > check_base_at:
                now = self._base_record()
                if (now.get("epoch") != base.get("epoch") or now.get("finished")
                        or (now["round"] == k and now["close"] != base["close"] and not grouped)):
                    return None
                check_base_at = time.monotonic() + 2.0
            time.sleep(0.2)
        return None

    def run_forever(self) -> None:
        """Train and merge until --max-rounds, or the coordinator ends the run. Transient network failures (the
        coordinator restarting, a lost connection) are retried for `RETRY_S` before the peer gives up."""
        if self.pipelined:
            return self.run_pipelined()
        merged, failing_since = 0, None
        while self.opts.max_rounds is None or merged < self.opts.max_rounds:
            try:
                if self._behind_schedule():
                    merged += self.follow_round()
                else:
                    self.train_round()
                    merged += self.join_round()
                failing_since = None
            except RunFinished:
                return self._end_of_run(None)
            except NetworkError as err:
                if self._recover(err, failing_since):
                    return
                failing_since = failing_since or time.monotonic()

    def run_pipelined(self) -> None:
        """Train without ever waiting for the network (design notes §5), until --max-rounds or the end of the run.

        Between two steps, and only there, the base may change: the round in flight lands once its merged base is
        ready (fetched and merged beside training), and, with none in flight, the next one takes off when our
        round is about to close: our snapshot is announced, or, if the round closed without us, its commit is
        followed. At most one round is in flight, so every member of a round trained against the one base they
        share. With --schedule lockstep a snapshot comes every T steps and the round in flight lands just before
        the next one (training waits for it if late): the simulator's lte.merge_delay = T, step for step."""
        merged, flight, failing_since = 0, None, None
        lockstep, T = self.opts.schedule == "lockstep", self.spec.lte.merge_every
        with tqdm(desc="training", unit="step", disable=not self.opts.progress, dynamic_ncols=True) as bar:
            while self.opts.max_rounds is None or merged < self.opts.max_rounds:
                try:
                    if self.steps_since_sent < MAX_ROUND_STEPS * T:
                        self._step()
                        bar.update()
                    else:  # a long round: wait for it rather than run ahead of the run (MAX_ROUND_STEPS)
                        time.sleep(0.02)
                    # lockstep lands exactly T steps after its snapshot, pipelined as soon as the merge is ready
                    if flight is not None and (self.steps_since_sent >= T if lockstep else flight.done()):
                        landed = self._land(flight)
                        flight, merged = None, merged + landed
                        failing_since = None if landed else failing_since
                        bar.set_postfix(round=self.round)
                    if flight is None:
                        flight = self._take_off(lockstep)
                except RunFinished:
                    return self._end_of_run(flight)
                except NetworkError as err:
                    flight = None  # whatever it was doing: the resync below replaces the base it would land on
                    if self._recover(err, failing_since):
                        return
                    failing_since = failing_since or time.monotonic()

    def _end_of_run(self, flight: Flight | None) -> None:
        """The coordinator ended the run: land the round in flight and follow the commits we did not merge, so that a
        live peer ends on the final base (the one the last checkpoint holds). A pipelined peer reads that the run is
        over between two steps, possibly before its last round landed (CI: a lab peer ended one round short).
        Best effort: the coordinator stays about a round after its last commit, and a peer cut off ends where it is."""
        try:
            if flight is not None:
                with contextlib.suppress(RunFinished):  # no commit for it: the catch-up below still follows the rest
                    self._land(flight)
            rec = self._base_record()
            if rec.get("finished") and int(rec["round"]) > self.round:
                self._catch_up(rec)
        except NetworkError as err:
            self.log({"event": "warning", "round": self.round, "error": f"ended short of the final base: {err}"})
        self.log({"event": "finished", "round": self.round})

    def _step(self) -> None:
        """One optimizer step, timed: the peer's pace (what the coordinator sizes windows from) and its utilization."""
        if self.round != self.clock[0]:
            self.clock = (self.round, 0)
        # The run's clock, not our step count, sets the learning rate (except in lockstep, which is the simulator
        # step for step): a peer faster than the fleet's pace takes more steps per round and would otherwise run
        # through the schedule early. Round k's steps sit where the simulator's are: (k + 1) T on, merge_delay = T.
        position = None if self.opts.schedule == "lockstep" else self.spec.lte.merge_every * (self.round + 1) + self.clock[1]
        t0 = time.perf_counter()
        n, loss = self.trainer.train_steps(1, position=position)
        dt = time.perf_counter() - t0
        self.clock = (self.round, self.clock[1] + 1)
        self.samples, self.steps_since_sent, self.timed_steps = self.samples + n, self.steps_since_sent + 1, \
            self.timed_steps + 1
        self.losses.append(loss)
        self.trained_seconds += dt
        # an average over about T steps (the EMA's 2 / (T + 1)): the coordinator sizes windows from the largest cycle
        # the fleet reports, and a 10-step average on a contended machine swung 3x between rounds, widening them all
        w = 2.0 / (self.spec.lte.merge_every + 1)
        self.step_seconds = dt if self.timed_steps == 1 else (1 - w) * self.step_seconds + w * dt
        if self.timed_steps >= self.spec.lte.merge_every:  # announced only once T steps were timed (cycle_seconds)
            self.train_seconds = self.spec.lte.merge_every * self.step_seconds
        self.metrics.trained(n, 1, self.step_seconds, loss)
        self.metrics.busy(dt)

    def _take_off(self, lockstep: bool) -> Flight | None:
        """The next round to put in flight, once it is due: our snapshot when our round is about to close (in
        lockstep: T steps after the last one), or following its commit when it closed without us."""
        rec = self._open_record()
        if rec is None:
            return None
        k, close, now = self.round, float(rec["close"]), get_dht_time()
        if lockstep:
            if self.steps_since_sent < self.spec.lte.merge_every:
                return None
        elif now < close - (LEAD_S + 1.2 * self.push_seconds):
            return None
        if now >= close or self.samples < self.spec.lte.merge_every * self.trainer.batch_size:
            # the round closes without us (too late, or fewer than T steps to give): follow it, training on
            self.last_flight = Flight(k, None, lambda: self._fly(k, rec, None))
            return self.last_flight
        sent = self._announce(k)
        self.announced = (k, (self.announced[1] if self.announced[0] == k else []) + [sent])
        self.steps_since_sent, self.sent_losses = 0, len(self.losses)
        self.last_flight = Flight(k, sent, lambda: self._fly(k, rec, sent))
        return self.last_flight

    def _open_record(self) -> dict[str, Any] | None:
        """The base record of the round we hold, read at most twice a second until it is there; None meanwhile.
        Passed rounds are followed (keeping our progress) or the base downloaded, as in the synchronous loop."""
        if self.open_rec is not None and int(self.open_rec["round"]) == self.round:
            return self.open_rec
        if time.monotonic() < self.read_at:
            return None
        self.read_at = time.monotonic() + 0.5
        rec = self._base_record()
        if rec.get("finished"):
            raise RunFinished()
        if int(rec["round"]) > self.round:
            if self.samples and not self.spec.lte.reset:
                self._catch_up(rec)
            else:
                self.resync()
            return None
        if int(rec["round"]) < self.round:  # published a moment after the commit we merged
            return None
        self.open_rec = rec
        publish(self.dht, alive_key(self.run), {"t": self.cycle_seconds()}, ttl=60, subkey=self.peer_id, wait=False)
        self._phase("train", self.round)  # on the base of round k until our snapshot: what fault tests signal on
        # here and at take-off (_fly): a checkpoint is listed a moment after its commit, and one served a few rounds
        # late may already be retired from the list, so nobody could download it from us when the coordinator is gone
        self._serve_checkpoint()
        return rec

    def _fly(self, k: int, rec: dict[str, Any], sent: Digest | None) -> Landing | None:
        """Round k beside training: upload (client mode), agree, prefetch, wait for the commit, fetch and merge.
        Returns the merged base to adopt, or None when no commit for round k came. `rec`: the base record it took
        off on (round k's window)."""
        close = float(rec["close"])
        self._serve_checkpoint()
        before = dict(self.blobs.traffic.received)  # the round's bytes (the checkpoint's are not)
        gathered: dict[str, Any] = {}
        if sent is not None:
            self._push(sent)
            self._phase("agree", k, cycle_s=round(sent.t, 3), step_s=round(self.step_seconds, 4))
            now = get_dht_time()
            try:
                gathered = self.members.agree(k, sent.to_dict(), deadline_s=max(1.0, close - now) + AGREE_GRACE_S,
                                              min_size=int(rec.get("min_size", 2)),
                                              scheduled_time=max(close, now + 0.5))
            except GroupNotFound:
                pass  # the commit may still merge us (a group can close without our matchmaking hearing of it)
            if self.coordinator in gathered:
                self._phase("fetch", k, members=len(gathered) - 1)
                self._prefetch(k, gathered, sent)
        else:
            self._phase("follow", k, training=True)
        commit = self._wait_commit(k, close - get_dht_time(), opened=rec, grouped=self.coordinator in gathered)
        if commit is None:
            return None
        ours = commit["members"].get(self.peer_id)
        if ours is not None and (sent is None or ours.get("f") != sent.f):
            raise NetworkError(f"round {k}'s commit merges a contribution of ours that this snapshot did not send")
        self._phase("merge", k, member=ours is not None)
        t0 = time.perf_counter()
        state = self._merged_state(k, commit, sent.f if ours else None, exchange=self.peer_id in gathered)
        snapshot = None
        # Merged, the base now accounts for our snapshot: the decoded bytes we announced, and we keep what we trained
        # since. Rejected, all our progress is dropped, as a synchronous peer drops it: the steps since the snapshot
        # were taken on a model that held the rejected progress at full weight, and they partly correct it, so
        # sent without it they harm. Kept, they made honest peers' next contributions worse, rejected again, round
        # after round (`make demo`: one peer at a time rejected in 18 of 30 rounds, scores down to -0.18).
        # Left out for any other reason (no group, too late), all our progress stays.
        if ours is not None:
            snapshot = Snapshot(self.trainer.model.head_ids[0], sent.n, local_factors(self.blobs, self.layout, sent.f),
                                {}, unpack_replicas(self.layout, self.blobs.store.tensors(sent.r)))
        rejected = sent is not None and self.peer_id in commit.get("rejected", {})
        return Landing(k, commit, state, state_bytes(state), close, before, sent.loss if sent else None,
                       sent=sent.f if ours else None, seconds=time.perf_counter() - t0, snapshot=snapshot,
                       snapshot_f=sent.f if snapshot is not None else None, rejected=rejected)

    def _land(self, flight: Flight) -> bool:
        """Adopt the round in flight (waiting for it if it is not done). Returns whether a commit was merged."""
        try:
            landing = flight.result()
        except Rejected as err:
            self._refuse(flight.k, err)
            return False
        self.open_rec = None  # the round we hold changes, or its window was opened again
        if landing is None:  # no commit for round k: no group formed, or the coordinator restarted
            self._resync_unless_holding(flight.k)
            return False
        landed = self._adopt(landing, keep_progress=landing.snapshot is None and not landing.rejected,
                             snapshot=landing.snapshot)
        self.apply_seconds = landing.seconds
        return landed

    def _recover(self, err: NetworkError, failing_since: float | None) -> bool:
        """After a failed round: retry from a fresh base download for up to RETRY_S (re-raising after that).
        Returns True when the run turned out to have ended."""
        self.metrics.network_error(err)
        if self._run_finished():  # the coordinator ended the run and left while we were fetching
            self.log({"event": "finished", "round": self.round})
            return True
        if failing_since is not None and time.monotonic() - failing_since > RETRY_S:
            raise err
        self.log({"event": "retry", "round": self.round, "error": str(err)})
        time.sleep(2.0)
        reconnect(self.dht, self.opts.dht)
        try:
            self.resync()
        except NetworkError:
            pass
        return False

    def close(self) -> None:
        shutdown_node(self.members, self.blobs, dht=self.dht)
        if self.last_flight is not None:
            self.last_flight.join(FLIGHT_EXIT_S)
