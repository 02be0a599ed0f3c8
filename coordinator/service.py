"""The coordinator: first DHT node of a run, holder of the authoritative base, commit point of every round.

It trains nothing. Each round it joins the membership agreement, fetches every member's blobs, merges the
members whose blobs arrived before the deadline, and publishes a signed commit (member set + resulting base
hash) that every peer follows, so all participants merge exactly the same contributions. See docs/protocol.md.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_dht_time

import lte
from lte.checkpoint import state_bytes, state_hash
from lte.config import RunSpec
from lte.data import load_datasets
from lte.lora import prepare_model
from lte.merge import apply_update
from lte.models import create_base_model
from lte.net import GroupNotFound
from lte.net.blobs import BlobService
from lte.net.membership import Membership
from lte.net.node import shutdown_node, start_dht, visible_maddrs
from lte.net.records import (default_validators, fingerprint, load_or_create_private_key, owner_tag,
                              publish_base_hash, publish_signed, read, read_base_hashes)
from lte.merge import merge_contributions
from lte.net.rounds import (BASE, PROTOCOL_VERSION, Digest, alive_key, as_dense, base_key, base_to_tensors, commit_key,
                            fetch_contributions, round_dense_layers, run_prefix, spec_key)
from lte.train import evaluate
from lte.wire import Layout


@dataclass
class CoordinatorOptions:
    checkpoint_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int | None = None
    identity: Path | None = None
    round_seconds: float = 4.0
    fetch_timeout: float = 20.0
    eval_every: int = 1
    checkpoint_every: int = 5
    wire: str = "raw"
    max_rounds: int | None = None
    min_peers: int = 1
    paths: str = "auto"  # auto | factors | dense: how merged layers travel between peers


@dataclass
class PeerStats:
    samples: int = 0
    rounds: int = 0
    last_round: int = -1


class Coordinator:
    def __init__(self, spec: RunSpec, opts: CoordinatorOptions):
        self.spec, self.opts = spec, opts
        self.run, self.spec_hash = spec.run, spec.spec_hash()
        opts.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_private_key(opts.identity or opts.checkpoint_dir / "coordinator.key")
        self.owner = owner_tag(self.key)
        torch.manual_seed(spec.seed)
        self.eval_model = create_base_model(spec.model).eval()
        self.base: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.eval_model.state_dict().items()}
        self.layout = Layout.of(prepare_model(copy.deepcopy(self.eval_model),
                                              spec.lte.model_copy(update={"heads": 1}), spec.seed))
        self.test_set = load_datasets(spec.data, spec.seed)[1]
        self.round = 0
        self.base_hash = state_hash(self.base)
        self.peers: dict[str, PeerStats] = {}
        self.evaluation: dict[str, Any] | None = None
        self.evaluate()  # round 0 too, so a run's curve starts at the untrained model
        self.history: list[dict[str, Any]] = []
        self.finished = False
        self.checkpoints_saved = 0
        self.dht = self.blobs = self.members = None
        try:
            self.dht = start_dht([], host=opts.host, port=opts.port, identity_path=str(opts.checkpoint_dir / "p2p.id"),
                                 validators=default_validators(self.key))
            self.peer_id = self.dht.peer_id.to_base58()
            self.blobs = BlobService(self.dht, namespace=run_prefix(self.run), accept_push=True)
            self.members = Membership(self.dht, prefix=run_prefix(self.run))
            self.next_close = get_dht_time() + opts.round_seconds
            self.publish_spec()
            self.publish_base()
        except BaseException:
            self.close()  # a half-started node must not leave DHT or p2pd processes behind
            raise

    # ----- records ------------------------------------------------------------------------------------------
    def join_addr(self) -> str:
        return visible_maddrs(self.dht)[0]

    def publish_spec(self) -> None:
        publish_signed(self.dht, spec_key(self.peer_id), {
            "spec": self.spec.model_dump(mode="json"), "spec_hash": self.spec_hash, "version": lte.__version__,
            "protocol": PROTOCOL_VERSION, "coordinator": self.peer_id, "wire": self.opts.wire, "paths": self.opts.paths,
            "round_seconds": self.opts.round_seconds, "fetch_timeout": self.opts.fetch_timeout,
        }, self.owner, ttl=3600)

    def publish_base(self) -> None:
        sha = self.blobs.put(base_to_tensors(self.base), kind=BASE, round_id=self.round)
        publish_signed(self.dht, base_key(self.run), {
            "round": self.round, "hash": self.base_hash, "blob": sha, "close": self.next_close,
            "finished": self.finished, "min_size": self.opts.min_peers + 1,
        }, self.owner, ttl=3600)

    # ----- one round ----------------------------------------------------------------------------------------
    def run_round(self) -> dict[str, Any] | None:
        """Agree on members, fetch, merge, commit. Returns the round's summary, or None when no peer came."""
        k, close = self.round, self.next_close
        me = Digest(coordinator=True, spec=self.spec_hash).to_dict()
        try:
            gathered = self.members.agree(k, me, deadline_s=max(1.0, close - get_dht_time()) + 2.0,
                                          min_size=self.opts.min_peers + 1,
                                          scheduled_time=max(close, get_dht_time() + 0.5))
        except GroupNotFound:
            self.next_close = get_dht_time() + self.window([])
            self.publish_base()
            return None
        t0 = time.perf_counter()
        digests = {pid: Digest.from_dict(d) for pid, d in gathered.items() if pid != self.peer_id}
        accepted, contributions = {}, []
        for pid, d in sorted(digests.items()):
            if d.coordinator or d.spec != self.spec_hash or d.n <= 0:
                continue
            try:
                contributions += fetch_contributions(self.blobs, self.layout, {pid: d}, {pid: [pid]}, k,
                                                     self.opts.fetch_timeout, self.layout.layers)
                accepted[pid] = d
            except Exception as err:  # a member that cannot deliver is left out, for everyone alike
                print(f"round {k}: left out {pid[-8:]}: {err}", flush=True)
        dense = round_dense_layers(self.layout, accepted, self.opts.paths)
        if contributions:
            contributions = [as_dense(c, dense) for c in contributions]
            apply_update(self.base, merge_contributions(contributions, self.spec.lte.scale))
            self.base_hash = state_hash(self.base)
        publish_signed(self.dht, commit_key(self.run, k), {
            "round": k, "members": {pid: d.to_dict() for pid, d in accepted.items()}, "hash": self.base_hash,
        }, self.owner, ttl=600)
        self.round = k + 1
        self.next_close = get_dht_time() + self.window([d.t for d in accepted.values()])
        self.publish_base()
        publish_base_hash(self.dht, self.run, self.round, self.peer_id, self.base_hash)
        self.blobs.store.drop_rounds_before(k - 1)
        for pid, d in accepted.items():
            st = self.peers.setdefault(pid, PeerStats())
            st.samples, st.rounds, st.last_round = st.samples + d.n, st.rounds + 1, k
        summary = {"round": self.round, "peers": len(accepted), "merge_s": time.perf_counter() - t0,
                   "dense_layers": len(dense),
                   "mean_loss": (sum(d.loss for d in accepted.values()) / len(accepted)) if accepted else None,
                   "base_hash": self.base_hash, "bytes_received": sum(self.blobs.traffic.received.values()),
                   "bytes_sent": sum(self.blobs.traffic.sent.values())}
        if accepted and self.round % self.opts.eval_every == 0:
            self.evaluate()
            summary.update(test_accuracy=self.evaluation["test_accuracy"], test_loss=self.evaluation["test_loss"])
        if self.round % self.opts.checkpoint_every == 0:
            summary["checkpoint"] = str(self.save_checkpoint())
        self.history.append(summary)
        return summary

    def window(self, member_times: list[float]) -> float:
        """Seconds until the next round closes: enough for the slowest live peer's T local steps (members of this
        round and peers that announced themselves, e.g. after missing it), or it would miss every round."""
        alive = read(self.dht, alive_key(self.run))
        times = list(member_times)
        if isinstance(alive, dict):
            times += [float(v.get("t", 0.0)) for v in alive.values() if isinstance(v, dict)]
        return max(self.opts.round_seconds, 1.5 * max(times, default=0.0) + 1.0)

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
        publishes its base hash for the final round), then for one more round window.

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
        time.sleep(max(0.0, min(self.window([]), deadline - time.monotonic())))

    def save_checkpoint(self) -> Path:
        """model.safetensors + meta.json in round-NNNNNN/, then `latest` is switched atomically."""
        d = self.opts.checkpoint_dir / f"round-{self.round:06d}"
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "model.safetensors").write_bytes(state_bytes(self.base))
        (tmp / "meta.json").write_text(json.dumps({
            "run": self.run, "round": self.round, "base_hash": self.base_hash, "spec_hash": self.spec_hash,
            "spec": self.spec.model_dump(mode="json"), "evaluation": self.evaluation, "created": time.time()}, indent=1))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
        link = self.opts.checkpoint_dir / "latest.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(d.name)
        link.replace(self.opts.checkpoint_dir / "latest")
        self.checkpoints_saved += 1
        return d

    def status(self) -> dict[str, Any]:
        return {"run": self.run, "spec_hash": self.spec_hash, "round": self.round, "base_hash": self.base_hash,
                "coordinator": self.peer_id, "owner": fingerprint(self.owner),
                "join": f"lte-peer join --dht {self.join_addr()}",
                "peers": {pid: {"samples": st.samples, "rounds": st.rounds, "last_round": st.last_round}
                          for pid, st in self.peers.items() if st.last_round >= self.round - 3},
                "evaluation": self.evaluation, "history": self.history[-50:]}

    def close(self) -> None:
        shutdown_node(self.members, self.blobs, dht=self.dht)
