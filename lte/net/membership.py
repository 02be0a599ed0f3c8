"""Round membership agreement: which peers take part in round r, and what each of them announced.

hivemind's `DecentralizedAverager.step(gather=...)` gives every member of a formed group the identical
{peer: gathered} dict. That is the only property used here; nothing is averaged. Design choices:

- One averager for the node's lifetime. Each round id is written into the averager's *group bits*, so the
  matchmaking key is f"{prefix}.0b{round id in 32 bits}". Peers of different rounds look each other up under
  different DHT keys, and a leader rejects a join request whose key differs from its own (BAD_GROUP_KEY),
  so rounds cannot mix. A new averager per round would also separate rounds but costs a process start and a
  p2pd handler registration each round.
- No all-reduce after matchmaking: `_aggregate_with_group` is overridden to return the gathered dict
  straight away. The all-reduce would only average a dummy tensor, and it adds a network phase in which a
  dying peer makes some members fail and others succeed.
- A participant that contributes nothing (the coordinator) simply joins with a digest that says so; with no
  all-reduce there is no weight to set, and hivemind's `auxiliary` mode (broken in 1.1.12) is not needed.
- Client-mode nodes join groups led by reachable nodes; at least one reachable node must take part.

Split groups: with `target_group_size=None` a leader closes its group when its matchmaking time ends, so
peers that arrive later form another group for the same round. Give every participant of a round the same
`scheduled_time` (e.g. round start + a few seconds, announced by the coordinator) so that they all wait for
the same moment; and treat a result that lacks the coordinator as "not in the round".
"""
from __future__ import annotations

import os
import threading
from typing import Any

import hivemind
import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import StepControl
from hivemind.utils import MPFuture, MSGPackSerializer, get_dht_time

from lte.net.errors import GroupNotFound, NetworkError, one_line
from lte.net.procs import forget_at_exit, prepare_hivemind_child, stop_at_exit

__all__ = ["AGREE_GRACE_S", "MAX_DIGEST_BYTES", "Membership", "round_bits"]

# How long a peer's matchmaking goes on past its round's close: clocks and DHT reads differ by a few hundred ms, and a
# peer that gave up at the close missed groups its slower fellows were still forming. The coordinator stays this much
# longer at the end of a run, so that a peer whose search outlives the last round can still read that the run is over.
AGREE_GRACE_S = 3.0

# gather payloads above ~0.15 MB hang hivemind's averager (non-blocking pipe); digests are meant to be tiny.
MAX_DIGEST_BYTES = 10_000
ROUND_BITS = 32
# Time allowed after the group-finding deadline for the result to come back from the averager process.
_RESULT_GRACE_S = 10.0


def round_bits(round_id: int) -> str:
    """The averager group bits that encode `round_id` (mod 2**32)."""
    if round_id < 0:
        raise ValueError(f"round id must be >= 0, got {round_id}")
    return format(round_id % 2**ROUND_BITS, f"0{ROUND_BITS}b")


class _MembershipAverager(hivemind.averaging.DecentralizedAverager):
    """An averager that only forms groups. Its class name is part of the RPC handler names: keep it stable."""

    def run(self) -> None:
        prepare_hivemind_child(own_process_group=False)
        super().run()

    async def _set_round(self, group_bits: str, min_group_size: int, future: Any) -> None:
        # runs in the averager process, called through hivemind's control pipe (like set_group_bits)
        try:
            self._matchmaking.group_key_manager.group_bits = group_bits
            self._matchmaking.min_group_size = min_group_size
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)

    async def _aggregate_with_group(self, group_info: Any, min_vector_size: int, **kwargs: Any) -> dict:
        _bandwidths, _modes, user_data = zip(*map(self.serializer.loads, group_info.gathered))
        return dict(zip(group_info.peer_ids, map(self.serializer.loads, user_data)))


class Membership:
    """Agrees with other nodes on the member set of each round (one `agree` at a time)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        prefix: str = "lte_members",
        *,
        min_matchmaking_time: float = 1.5,
        request_timeout: float = 1.0,
        client_mode: bool | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        """`prefix` names the swarm-wide matchmaking key (no dots); every node of a run must use the same one.

        `min_matchmaking_time` is how long a leader waits for followers; `request_timeout` must stay below it.
        """
        if "." in prefix:
            raise ValueError(f"prefix must not contain '.', got {prefix!r}")
        if request_timeout >= min_matchmaking_time:
            raise ValueError("request_timeout must be below min_matchmaking_time (hivemind can deadlock otherwise)")
        self._lock = threading.Lock()
        self._averager = _MembershipAverager(
            [torch.zeros(1)],  # required by the averager, never averaged
            dht,
            prefix=prefix,
            start=False,
            target_group_size=None,
            min_group_size=2,
            min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout,
            client_mode=client_mode,
            allow_state_sharing=False,
        )
        # Not run_in_background(): it sets SIGINT to SIG_IGN in *this* process (so that the child inherits it)
        # and fails off the main thread; the child ignores SIGINT by itself instead (prepare_hivemind_child).
        self._averager.start()
        try:
            self._averager.wait_until_ready(timeout=startup_timeout)
        except Exception as e:
            self._stop_averager()
            raise NetworkError(f"cannot start membership averager: {one_line(e)}") from e
        stop_at_exit(self, Membership.shutdown)

    def agree(
        self,
        round_id: int,
        digest: dict,
        deadline_s: float,
        min_size: int = 2,
        *,
        scheduled_time: float | None = None,
    ) -> dict[str, Any]:
        """Join round `round_id` with `digest` and return {peer id: digest} of the group that formed.

        Every member of the group gets the identical dict (itself included). `deadline_s` bounds the search
        for a group, in seconds from now; `min_size` counts this node too and should be the same on every
        participant (the leader's value decides). `scheduled_time` (DHT time, default now + matchmaking
        time) is when the group closes: pass the same value on all participants of a round.

        Raises GroupNotFound if no group of `min_size` formed in time; ValueError for a digest over
        MAX_DIGEST_BYTES; NetworkError if the averager failed.
        """
        size = len(MSGPackSerializer.dumps(digest))
        if size > MAX_DIGEST_BYTES:
            raise ValueError(f"digest of {size} bytes exceeds {MAX_DIGEST_BYTES} (large gathers hang hivemind)")
        if min_size < 2:
            raise ValueError("min_size must be at least 2 (this node and one other)")
        now = get_dht_time()
        if scheduled_time is not None and scheduled_time >= now + deadline_s:
            raise ValueError("scheduled_time must fall before the deadline")
        with self._lock:
            self._set_round(round_bits(round_id), min_size)
            control: StepControl = self._averager.step(
                gather=digest, scheduled_time=scheduled_time, timeout=deadline_s, allow_retries=True, wait=False
            )
            try:
                gathered = control.result(timeout=deadline_s + _RESULT_GRACE_S)
            except Exception as e:
                control.cancel()
                if isinstance(e, (TimeoutError, AllreduceException)):  # hivemind: "could not find a group"
                    raise GroupNotFound(
                        f"round {round_id}: no group of >= {min_size} formed within {deadline_s:.1f} s"
                    ) from e
                raise NetworkError(f"round {round_id}: membership agreement failed: {one_line(e)}") from e
        if gathered is None or len(gathered) < min_size:
            raise GroupNotFound(f"round {round_id}: group of {len(gathered or ())} < {min_size}")
        return {peer.to_base58(): value for peer, value in gathered.items()}

    def _set_round(self, group_bits: str, min_size: int) -> None:
        if not self._averager.is_alive():
            raise NetworkError("membership averager is not running")
        # the same control-pipe call that hivemind's public set_group_bits() makes
        future = MPFuture()
        request = dict(group_bits=group_bits, min_group_size=min_size, future=future)
        self._averager._outer_pipe.send(("_set_round", [], request))
        future.result(timeout=30)

    @property
    def peer_id(self) -> str:
        return self._averager.peer_id.to_base58()

    def shutdown(self) -> None:
        """Stop the averager process. Call before shutting down the DHT. Idempotent."""
        forget_at_exit(self)
        self._stop_averager()

    def _stop_averager(self) -> None:
        averager = self._averager
        if averager.pid is None or averager._parent_pid != os.getpid():
            return
        if averager.is_alive():
            averager.shutdown()
        averager.join(5)

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
