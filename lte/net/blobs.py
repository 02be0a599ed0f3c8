"""Blob exchange over hivemind P2P: serve the local `BlobStore`, fetch blobs from peers, push blobs to a peer.

Blobs are addressed by content (see `lte.net.blobstore`), so a blob can be fetched from any node that holds
it and every fetch is verified against its address. A client-mode peer (behind NAT, cannot serve) pushes its
blob to a reachable node that accepts pushes (the coordinator); that node verifies the hash and then serves
the blob under the same address.

Wire protocol (handler names are f"{namespace}::BlobServicer.rpc_*", so the class name is part of it):
- rpc_get_blob: request uid=sha; response stream = one header message (msgpack metadata
  {"found", "count", "nbytes"}) then one message per chunk of at most `chunk_bytes`.
- rpc_offer_blob (unary): uid=sha, metadata {"count", "nbytes"} -> {"status": "have" | "send" | "reject"}.
- rpc_push_blob: request stream = header (uid=sha, metadata {"count", "kind", "round"}) then chunks;
  response {"status": "ok" | "error", "reason"}.
- rpc_dial_back (unary, served by nodes that accept pushes): metadata {"maddrs": [...]} -> {"reachable": [...]},
  the addresses to which a fresh TCP connection opened (how a peer learns whether it must run in client mode).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from contextlib import aclosing
# typing's AsyncIterator, not collections.abc's: hivemind's ServicerBase recognizes streaming handlers
# by the typing alias (`hint._name`), and would register them as unary ones otherwise.
from typing import Any, AsyncIterator

import hivemind
import torch
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from lte.net.aio import LoopThread
from lte.net.blobstore import BlobStore, FileBlob, FileDigest, Wire, decode, digest
from lte.net.counters import INTERRUPTED, TrafficCounter
from lte.net.errors import (
    BlobFetchError,
    BlobIntegrityError,
    BlobMalformed,
    BlobNotFound,
    BlobTimeout,
    BlobTruncated,
    BlobUnreachable,
    NetworkError,
    one_line,
)
from lte.net.procs import forget_at_exit, stop_at_exit

__all__ = ["BlobService", "BlobServicer", "BlobStore", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 2**20
MAX_DIAL_BACK = 4  # addresses dialled per request: enough for a host's own, too few to be a port scanner
DIAL_BACK_TIMEOUT_S = 3.0
PeerLike = PeerID | str


def _meta(message: Any) -> dict[str, Any]:
    """Decode a message's msgpack metadata; anything malformed reads as an empty dict."""
    try:
        value = MSGPackSerializer.loads(message.metadata) if message is not None and message.metadata else {}
    except Exception:
        return {}
    return value if isinstance(value, dict) else {}


def _pack(**fields: Any) -> bytes:
    return MSGPackSerializer.dumps(fields)


def _as_peer(peer: PeerLike) -> PeerID:
    return peer if isinstance(peer, PeerID) else PeerID.from_base58(str(peer))


class _Reassembler:
    """Rebuilds serialized tensors from chunks (the first chunk of each tensor says how many follow)."""

    def __init__(self) -> None:
        self.parts: list[runtime_pb2.Tensor] = []
        self._current: list[runtime_pb2.Tensor] = []
        self._expected = 0

    def add(self, chunk: runtime_pb2.Tensor) -> None:
        if not self._current:
            self._expected = max(1, chunk.chunks)
        self._current.append(chunk)
        if len(self._current) == self._expected:
            self.parts.append(combine_from_streaming(self._current))
            self._current = []

    @property
    def complete(self) -> bool:
        return not self._current


# A peer that cannot be reached is asked this many more times before the next source is tried.
DIAL_RETRIES = 1
# A stream that opened and then broke off (reset, or ended early) is asked again from the same peer this many more
# times. On a loaded machine or a home link a libp2p stream occasionally dies mid-transfer, and a joining peer that
# downloads a whole base without a deadline must not give up on the first break (seen in CI: the run never formed);
# a peer whose stream breaks every time is faulty, and it must not be asked forever either.
BREAK_RETRIES = 3
# How long opening a connection to a peer at its announced addresses may take (three round trips and a TLS
# handshake even on a slow home link; a dead address costs the fallback to the next source this long at most).
DIAL_TIMEOUT_S = 10.0


def _answer_header(first: Any, sha: str, peer: PeerLike) -> dict[str, Any]:
    """The header a server's answer starts with. hivemind ends a stream's iteration silently when the stream is
    closed or reset (IncompleteReadError), so no answer at all is a stream that broke off, to be asked again
    (BREAK_RETRIES), never the peer saying it lacks the blob: CI saw members rejected as `fetch_failed` with
    "not found at <the member itself>" while each had begun to send that very blob."""
    if first is None:
        raise BlobTruncated(f"blob {sha[:12]} from {peer}: stream closed before any answer")
    header = _meta(first)
    if header.get("found") is False:
        raise BlobNotFound(f"blob {sha[:12]} not found at {peer}")
    if header.get("found") is not True:
        raise BlobFetchError(f"blob {sha[:12]} from {peer}: unreadable answer header")
    return header


def _stream_not_opened(error: BaseException) -> BlobUnreachable:
    """A p2pd control error before any answer came back: no connection reached the peer ("failed to dial",
    "routing: not found" when p2pd knows no address for it, "protocol not supported" from a node that does not
    serve this run). Retrying the same peer cannot help, unlike a stream that opened and then broke off."""
    return BlobUnreachable(f"cannot reach the peer ({one_line(error)})")


class BlobServicer(ServicerBase):
    """RPC handlers serving a BlobStore; runs on the host process's event loop."""

    def __init__(
        self, store: BlobStore, traffic: TrafficCounter, *, accept_push: bool, max_push_bytes: int, chunk_bytes: int
    ) -> None:
        self.store, self.traffic = store, traffic
        self.accept_push, self.max_push_bytes, self.chunk_bytes = accept_push, max_push_bytes, chunk_bytes

    async def rpc_get_blob(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        blob = self.store.get(request.uid)
        if blob is None:
            yield runtime_pb2.ExpertResponse(metadata=_pack(found=False))
            return
        if isinstance(blob, FileBlob):  # read from disk as it goes: a checkpoint is never loaded to be served
            count, chunks = 1, blob.chunks(self.chunk_bytes)
        else:
            count = len(blob.parts)
            chunks = (c for part in blob.parts for c in split_for_streaming(part, self.chunk_bytes))
        yield runtime_pb2.ExpertResponse(metadata=_pack(found=True, count=count, nbytes=blob.nbytes))
        for chunk in chunks:
            # counted before the send so that totals are final when the receiver has everything
            self.traffic.add_sent(blob.kind, len(chunk.buffer))
            yield runtime_pb2.ExpertResponse(tensors=[chunk])

    async def rpc_offer_blob(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if request.uid in self.store:
            return runtime_pb2.ExpertResponse(metadata=_pack(status="have"))
        refusal = self._refusal(_meta(request).get("nbytes"))
        if refusal:
            return runtime_pb2.ExpertResponse(metadata=_pack(status="reject", reason=refusal))
        return runtime_pb2.ExpertResponse(metadata=_pack(status="send"))

    async def rpc_push_blob(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        header = await anext(requests, None)
        meta, sha = _meta(header), header.uid if header is not None else ""
        kind, round_id, count = meta.get("kind", "push"), meta.get("round"), meta.get("count")
        refusal = self._refusal(0)
        if refusal:
            return runtime_pb2.ExpertResponse(metadata=_pack(status="error", reason=refusal))
        received, total, complete = _Reassembler(), 0, False
        try:
            async for request in requests:
                for chunk in request.tensors:
                    total += len(chunk.buffer)
                    if total > self.max_push_bytes:
                        return runtime_pb2.ExpertResponse(metadata=_pack(status="error", reason="blob too large"))
                    received.add(chunk)
            complete = received.complete and len(received.parts) == count
        finally:
            self.traffic.add_received(kind if complete else INTERRUPTED, total)
        if not complete:
            return runtime_pb2.ExpertResponse(metadata=_pack(status="error", reason="truncated blob"))
        if await asyncio.to_thread(digest, received.parts) != sha:
            return runtime_pb2.ExpertResponse(metadata=_pack(status="error", reason="hash mismatch"))
        round_id = round_id if isinstance(round_id, int) else None
        self.store.put_encoded(received.parts, kind=str(kind), round_id=round_id, sha=sha)
        return runtime_pb2.ExpertResponse(metadata=_pack(status="ok"))

    async def rpc_dial_back(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        if not self.accept_push:
            return runtime_pb2.ExpertResponse(metadata=_pack(reachable=[], reason="this node does not dial back"))
        addrs = _meta(request).get("maddrs")
        addrs = [a for a in addrs if isinstance(a, str)][:MAX_DIAL_BACK] if isinstance(addrs, list) else []
        ok = await asyncio.gather(*(_tcp_reachable(a, DIAL_BACK_TIMEOUT_S) for a in addrs))
        return runtime_pb2.ExpertResponse(metadata=_pack(reachable=[a for a, good in zip(addrs, ok) if good]))

    def _refusal(self, nbytes: Any) -> str | None:
        if not self.accept_push:
            return "this node does not accept pushed blobs"
        if not isinstance(nbytes, int) or nbytes > self.max_push_bytes:
            return f"blob size must be an int <= {self.max_push_bytes} bytes"
        return None


async def _tcp_reachable(maddr: str, timeout: float) -> bool:
    """Whether a fresh TCP connection to `maddr` (/ip4|ip6|dns*/HOST/tcp/PORT/...) opens. A fresh one on
    purpose: the libp2p connection the asking peer opened to us would answer even from behind NAT."""
    parts = maddr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp":
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts[2], int(parts[4])), timeout)
    except (OSError, ValueError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _daemon_maddr(_dht: hivemind.DHT, node: Any) -> Any:
    # runs inside the DHT process (via DHT.run_coroutine)
    return node.p2p.daemon_listen_maddr


class BlobService:
    """Serves this node's blobs and fetches/pushes blobs from/to peers. Synchronous API, thread-safe.

    Owns a private event loop thread and its own replica of the DHT's p2pd connection (not the DHT's cached
    `replicate_p2p()` replica, which is bound to whichever loop created it first). Close it before the DHT.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        namespace: str = "lte",
        *,
        accept_push: bool = False,
        max_push_bytes: int = 2**31,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        store: BlobStore | None = None,
    ) -> None:
        self.namespace = namespace
        self.store = store if store is not None else BlobStore()
        self.traffic = TrafficCounter()
        self._chunk_bytes = chunk_bytes
        self._servicer = BlobServicer(
            self.store, self.traffic, accept_push=accept_push, max_push_bytes=max_push_bytes, chunk_bytes=chunk_bytes
        )
        self._loop = LoopThread(f"blobs-{namespace}")
        try:
            self._p2p: P2P = self._loop.run(self._start(dht), timeout=30)
        except Exception as e:
            self._loop.close()
            raise NetworkError(f"cannot start blob service: {one_line(e)}") from e
        self.peer_id: str = self._p2p.peer_id.to_base58()
        self._addresses: dict[PeerID, list[Multiaddr]] = {}
        # sha -> the verified parts of a fetch in flight (touched on the loop thread only): see `_fetch_all`
        self._inflight: dict[str, asyncio.Future[list[runtime_pb2.Tensor]]] = {}
        stop_at_exit(self, BlobService.close)

    async def _start(self, dht: hivemind.DHT) -> P2P:
        maddr = await asyncio.to_thread(dht.run_coroutine, _daemon_maddr)
        p2p = await P2P.replicate(maddr)
        await self._servicer.add_p2p_handlers(p2p, namespace=self.namespace)
        return p2p

    # --- local blobs ----------------------------------------------------------------------------------

    def put(
        self, tensors: Sequence[torch.Tensor], *, kind: str, round_id: int | None = None, wire: Wire = "raw"
    ) -> str:
        """Store and serve `tensors` in the wire form the sender chooses; returns the blob's sha256 address.

        Use `self.store.tensors(sha)` afterwards for the values receivers will see (they differ with fp16).
        """
        return self.store.put(tensors, kind=kind, round_id=round_id, wire=wire)

    # --- remote blobs ---------------------------------------------------------------------------------

    def learn_addresses(self, addresses: Mapping[str, Sequence[str]]) -> None:
        """Remember where peers listen ({peer id: multiaddrs}, as their digests announce them); every later fetch
        from, push to or dial of such a peer first connects at those addresses.

        libp2p's own peer routing cannot be relied on to know a member's address (hivemind #472, #624); it also
        ignores addresses it deems unroutable, such as 198.18.0.0/15, so members of a run on a private network
        never found each other. The p2pd connection this opens is shared by the node's DHT too."""
        for peer, maddrs in addresses.items():
            parsed = []
            for text in maddrs:
                try:
                    addr = Multiaddr(text)
                    parsed.append(addr.decapsulate(Multiaddr(f"/p2p/{addr['p2p']}")) if "/p2p/" in text else addr)
                except Exception:  # noqa: BLE001 (a malformed address in a digest is ignored, not fatal)
                    continue
            if parsed:
                self._addresses[_as_peer(peer)] = parsed

    async def _connect(self, peer: PeerID) -> None:
        """Connect to `peer` at its learned addresses (a no-op for p2pd when a connection is open already)."""
        addrs = self._addresses.get(peer)
        if not addrs:
            return
        try:
            await asyncio.wait_for(self._p2p._client.connect(peer, addrs), DIAL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BlobUnreachable(f"cannot reach {peer} at {', '.join(map(str, addrs))} within "
                                  f"{DIAL_TIMEOUT_S:.0f} s") from None
        except P2PDaemonError as e:
            raise BlobUnreachable(f"cannot reach {peer} at {', '.join(map(str, addrs))} ({one_line(e)})") from None

    def fetch(
        self,
        peer: PeerLike,
        sha: str,
        *,
        kind: str,
        timeout: float = 60.0,
        keep: bool = False,
        round_id: int | None = None,
        stall_timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[torch.Tensor]:
        """Download blob `sha` from `peer`, verify it and return its tensors.

        A blob already held locally is returned without any transfer (same address, same bytes). With
        `keep`, the blob is stored and served afterwards (tagged `round_id` for `drop_rounds_before`).
        With `stall_timeout`, `timeout` is ignored and the download gives up only when nothing arrives for that
        long: a whole base takes minutes on a slow home link, and no fixed deadline fits every link.
        `progress(n, total)` is told each chunk's size and the blob's size; a transfer that broke off takes its
        bytes back with a negative `n` before it is asked again (`BREAK_RETRIES`), so the sum is what arrived whole.
        Raises BlobNotFound, BlobIntegrityError, BlobTimeout or BlobFetchError.
        """
        return self.fetch_many([(peer, sha)], kind=kind, timeout=timeout, keep=keep, round_id=round_id,
                               stall_timeout=stall_timeout, progress=progress)[0]

    def fetch_many(
        self,
        requests: Sequence[tuple[PeerLike, str]],
        *,
        kind: str,
        timeout: float = 60.0,
        keep: bool = False,
        round_id: int | None = None,
        stall_timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Fetch several (peer, sha) blobs in parallel, within `timeout` in all (or, with `stall_timeout`, for
        as long as chunks keep arriving; see `fetch`); results in request order.

        If any fetch fails, raises a BlobFetchError (a single failure is re-raised as is; several are
        summarized, with `.failures` = {(peer, sha): error}), because a round cannot use a partial set.
        """
        # no backstop timeout here: every transfer has its own, and hashing/decoding cannot hang
        results = self._loop.run(self._fetch_all(requests, kind, timeout, keep, round_id, stall_timeout, progress))
        failures = {req: res for req, res in zip(requests, results) if isinstance(res, BaseException)}
        if len(failures) == 1:
            raise next(iter(failures.values()))
        if failures:
            first = next(iter(failures.values()))
            raise BlobFetchError(f"{len(failures)} of {len(requests)} blob fetches failed, e.g. {first}", failures)
        return results

    async def _fetch_all(
        self, requests: Sequence[tuple[PeerLike, str]], kind: str, timeout: float, keep: bool, round_id: int | None,
        stall: float | None = None, progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        async def one(peer: PeerLike, sha: str) -> list[torch.Tensor]:
            local = self.store.get(sha)
            if local is not None:
                return await asyncio.to_thread(decode, local.parts)
            # One transfer per blob: a fetch of a blob already on its way (a peer's prefetch of a round's blobs,
            # then its merge) waits for that one instead of moving the bytes twice; if it fails, this one tries.
            if (pending := self._inflight.get(sha)) is not None:
                with contextlib.suppress(Exception):
                    parts = await asyncio.shield(pending)
                    if keep:
                        self.store.put_encoded(parts, kind=kind, round_id=round_id, sha=sha)
                    return await asyncio.to_thread(decode, parts)
            mine = self._inflight[sha] = asyncio.get_running_loop().create_future()
            try:
                parts, tensors = await self._verified(_as_peer(peer), sha, kind, timeout, stall, progress)
                mine.set_result(parts)
            except BaseException as e:
                mine.set_exception(e if isinstance(e, Exception) else BlobFetchError(f"blob {sha[:12]}: cancelled"))
                mine.exception()  # read here: whoever waits on it gets it too, and nobody else must
                raise
            finally:
                if self._inflight.get(sha) is mine:
                    del self._inflight[sha]
            if keep:
                self.store.put_encoded(parts, kind=kind, round_id=round_id, sha=sha)
            return tensors

        return await asyncio.gather(*(one(peer, sha) for peer, sha in requests), return_exceptions=True)

    async def _verified(self, peer: PeerID, sha: str, kind: str, timeout: float, stall: float | None,
                        progress: Callable[[int, int], None] | None) -> tuple[list[runtime_pb2.Tensor], list[torch.Tensor]]:
        """Blob `sha` from `peer`, checked against its address and decoded: (its parts, its tensors)."""
        parts = await self._download_retrying(peer, sha, kind, timeout, stall, progress)
        if await asyncio.to_thread(digest, parts) != sha:
            raise BlobIntegrityError(f"blob {sha[:12]} from {peer}: content does not match its hash")
        try:
            tensors = await asyncio.to_thread(decode, parts)
        except Exception as e:  # well addressed, but not tensors: never store or serve it
            raise BlobMalformed(f"blob {sha[:12]} from {peer}: does not decode ({one_line(e)})") from None
        return parts, tensors

    async def _download_retrying(self, peer: PeerID, sha: str, kind: str, timeout: float, stall: float | None = None,
                                 progress: Callable[[int, int], None] | None = None) -> list[runtime_pb2.Tensor]:
        """`_download` within `timeout` (with `stall`, for as long as chunks keep coming; see `fetch`), asked again
        from the same peer when the stream broke off: on a loaded machine or a slow home link a libp2p stream
        occasionally resets or ends early, and a round should not lose a member for it, nor a joining peer its base.
        A stream that keeps breaking off is asked again `BREAK_RETRIES` times only, then its last error is raised
        (with a deadline, also when too little time is left for another try): without a deadline nothing else would
        end it. A peer that says it lacks the blob, or stalls, is not asked again, and one that cannot be dialled is
        asked once more only (`DIAL_RETRIES`): it is most often a dead process, and every second spent on it delays
        the fallback to the next source (the coordinator) for a whole round."""
        if stall is not None:
            timeout = float("inf")
        deadline = asyncio.get_running_loop().time() + timeout
        truncated: BlobTruncated | None = None
        dials_left, breaks_left = DIAL_RETRIES, BREAK_RETRIES
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                download = self._download(peer, sha, kind, stall, progress)
                return await (download if stall is not None else asyncio.wait_for(download, max(left, 0.0)))
            except (BlobNotFound, BlobTimeout):
                raise
            except asyncio.TimeoutError:
                if truncated is not None:  # it kept breaking off: say so, not just "too slow"
                    raise truncated from None
                raise BlobTimeout(f"blob {sha[:12]} from {peer}: no complete answer within {timeout:.1f} s") from None
            except Exception as e:
                err = e if isinstance(e, BlobFetchError) else BlobFetchError(f"blob {sha[:12]} from {peer}: {one_line(e)}")
                if isinstance(e, BlobUnreachable):
                    err = BlobUnreachable(f"blob {sha[:12]} from {peer}: {e}")
                    dials_left -= 1
                else:  # the stream opened, then broke off (reset, or ended before the blob was whole)
                    breaks_left -= 1
                truncated = err if isinstance(err, BlobTruncated) else truncated
                if deadline - asyncio.get_running_loop().time() < 1.0 or dials_left < 0 or breaks_left < 0:
                    raise err from e
                await asyncio.sleep(0.2)

    async def _download(self, peer: PeerID, sha: str, kind: str, stall: float | None = None,
                        progress: Callable[[int, int], None] | None = None) -> list[runtime_pb2.Tensor]:
        await self._connect(peer)
        stub = BlobServicer.get_stub(self._p2p, peer, namespace=self.namespace)
        try:  # bounded by `stall` too: on a link that drops everything, nothing else would end the wait
            stream = await asyncio.wait_for(stub.rpc_get_blob(runtime_pb2.ExpertRequest(uid=sha)), stall)
        except P2PDaemonError as e:
            raise _stream_not_opened(e) from None
        except asyncio.TimeoutError:
            raise BlobTimeout(f"blob {sha[:12]} from {peer}: no answer for {stall:.0f} s") from None
        async with aclosing(stream):
            try:
                first = await asyncio.wait_for(anext(stream, None), stall)
            except P2PDaemonError as e:  # hivemind opens the stream at the first read
                raise _stream_not_opened(e) from None
            except asyncio.TimeoutError:
                raise BlobTimeout(f"blob {sha[:12]} from {peer}: no answer for {stall:.0f} s") from None
            header = _answer_header(first, sha, peer)
            received, nbytes, complete = _Reassembler(), 0, False
            try:
                while True:
                    try:
                        message = await asyncio.wait_for(anext(stream), stall)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        raise BlobTimeout(f"blob {sha[:12]} from {peer}: nothing received for {stall:.0f} s") from None
                    for chunk in message.tensors:
                        nbytes += len(chunk.buffer)
                        received.add(chunk)
                        if progress is not None:
                            progress(len(chunk.buffer), int(header.get("nbytes", 0)))
                complete = received.complete and len(received.parts) == header.get("count")
            finally:  # also on cancellation: the bytes crossed the wire either way
                self.traffic.add_received(kind if complete else INTERRUPTED, nbytes)
                if progress is not None and not complete and nbytes:  # the next try counts them again
                    progress(-nbytes, int(header.get("nbytes", 0)))
        if not complete:
            raise BlobTruncated(f"blob {sha[:12]} from {peer}: stream ended early")
        return received.parts

    def fetch_file(
        self,
        peer: PeerLike,
        sha: str,
        dest: str | os.PathLike[str],
        *,
        kind: str,
        stall_timeout: float = 60.0,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Download file blob `sha` (see `BlobStore.put_file`) from `peer` straight into the file `dest`, hashing
        the bytes as they arrive, so a large model is never held in memory; `progress(n)` is told each chunk's size.

        Gives up when no chunk arrives for `stall_timeout` s (a large file may take long, but never stalls). A stream
        that broke off (reset, or ended early) is downloaded again from the start, `BREAK_RETRIES` times at most: a
        checkpoint or data shard takes minutes on a home link, and one dead libp2p stream must not cost the source.
        The bytes of a broken try are taken back with a negative `progress(-n)` (a tqdm bar's `update` takes it).
        Returns the sha256 of the file's bytes. On any failure `dest` is removed and a BlobFetchError raised.
        """
        dest = Path(dest)
        try:
            download = self._download_file_retrying(_as_peer(peer), sha, dest, kind, stall_timeout, progress)
            return self._loop.run(download)
        except BaseException as e:
            dest.unlink(missing_ok=True)
            if isinstance(e, BlobFetchError) or not isinstance(e, Exception):
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise BlobTimeout(f"blob {sha[:12]} from {peer}: nothing received for {stall_timeout:.0f} s") from None
            raise BlobFetchError(f"blob {sha[:12]} from {peer}: {one_line(e)}") from e

    async def _download_file_retrying(self, peer: PeerID, sha: str, dest: Path, kind: str, stall: float,
                                      progress: Callable[[int], None] | None) -> str:
        """`_download_file`, started again when the stream broke off. Only a break is retried: a blob the peer
        lacks, a stall, bytes that fail their hash or a blob that is not a file would fail the same way again, and
        an error writing `dest` is ours, not the network's."""
        breaks_left = BREAK_RETRIES
        while True:
            try:
                return await self._download_file(peer, sha, dest, kind, stall, progress)
            except BlobFetchError as e:
                # the plain class is what a stream that opened and then failed raises; the subclasses are verdicts
                broke_off = isinstance(e, BlobTruncated) or type(e) is BlobFetchError
                if not broke_off or breaks_left <= 0:
                    raise
                breaks_left -= 1
                await asyncio.sleep(0.2)

    async def _download_file(self, peer: PeerID, sha: str, dest: Path, kind: str, stall: float,
                             progress: Callable[[int], None] | None) -> str:
        await self._connect(peer)
        stub = BlobServicer.get_stub(self._p2p, peer, namespace=self.namespace)

        async def receive(stream: AsyncIterator[runtime_pb2.ExpertResponse]) -> runtime_pb2.ExpertResponse | None:
            try:
                return await asyncio.wait_for(anext(stream, None), stall)
            except (asyncio.TimeoutError, P2PDaemonError):
                raise
            except Exception as e:  # the stream opened, then failed: worth another try, unlike a bad blob
                raise BlobFetchError(f"blob {sha[:12]} from {peer}: stream broke off ({one_line(e)})") from None

        stream = await asyncio.wait_for(stub.rpc_get_blob(runtime_pb2.ExpertRequest(uid=sha)), stall)
        nbytes, complete = 0, False
        try:
            async with aclosing(stream):
                header = _answer_header(await receive(stream), sha, peer)
                if header.get("count") != 1:
                    raise BlobIntegrityError(f"blob {sha[:12]} from {peer}: not a file blob")
                hashed: FileDigest | None = None
                with open(dest, "wb") as out:  # "wb": a try after a break starts from an empty file
                    while (message := await receive(stream)) is not None:
                        for chunk in message.tensors:
                            if hashed is None:  # the first chunk says what the blob is
                                if chunk.dtype != "uint8" or len(chunk.size) != 1:
                                    raise BlobIntegrityError(f"blob {sha[:12]} from {peer}: not a file blob")
                                hashed = FileDigest(int(chunk.size[0]))
                            hashed.update(chunk.buffer)
                            out.write(chunk.buffer)
                            nbytes += len(chunk.buffer)
                            if progress is not None:
                                progress(len(chunk.buffer))
                    out.flush()
                    os.fsync(out.fileno())
            complete = hashed is not None and hashed.seen == hashed.nbytes
        finally:  # as in `_download`: a broken transfer's bytes crossed the wire, but apart from the blob's kind
            self.traffic.add_received(kind if complete else INTERRUPTED, nbytes)
            if progress is not None and not complete and nbytes:  # a next try, or the next source, counts anew
                progress(-nbytes)
        if not complete or hashed is None:
            raise BlobTruncated(f"blob {sha[:12]} from {peer}: stream ended early")
        if hashed.blob_sha() != sha:
            raise BlobIntegrityError(f"blob {sha[:12]} from {peer}: content does not match its hash")
        return hashed.file_sha()

    def push(self, peer: PeerLike, sha: str, *, timeout: float = 60.0) -> bool:
        """Upload local blob `sha` to `peer` so that it serves it too (for client-mode peers).

        Returns False when the peer already had it (nothing sent), True after a verified upload.
        Raises NetworkError if the peer refuses it, or fails or times out; KeyError if `sha` is not local.
        """
        blob = self.store.get(sha)
        if blob is None:
            raise KeyError(sha)
        try:
            return self._loop.run(asyncio.wait_for(self._push(_as_peer(peer), sha, blob), timeout), timeout)
        except NetworkError:
            raise
        except asyncio.TimeoutError:
            raise NetworkError(f"push of blob {sha[:12]} to {peer}: no answer within {timeout:.1f} s") from None
        except Exception as e:
            raise NetworkError(f"push of blob {sha[:12]} to {peer}: {one_line(e)}") from e

    def dial_back(self, peer: PeerLike, maddrs: Sequence[str], *, timeout: float = 15.0) -> list[str]:
        """Ask `peer` (a node that accepts pushes: the coordinator) which of `maddrs` it can open a new TCP
        connection to. An empty answer means nobody can connect to us: we are behind NAT or a firewall.
        Raises NetworkError when `peer` does not answer."""
        request = runtime_pb2.ExpertRequest(metadata=_pack(maddrs=list(maddrs)))

        async def ask() -> list[str]:
            await self._connect(_as_peer(peer))
            stub = BlobServicer.get_stub(self._p2p, _as_peer(peer), namespace=self.namespace)
            answer = _meta(await stub.rpc_dial_back(request))
            if answer.get("reason"):
                raise NetworkError(f"{peer} {answer['reason']}")
            return [a for a in answer.get("reachable", []) if isinstance(a, str)]

        try:
            return self._loop.run(asyncio.wait_for(ask(), timeout), timeout + 1.0)
        except asyncio.TimeoutError:
            raise NetworkError(f"dial-back from {peer}: no answer within {timeout:.1f} s") from None
        except NetworkError:
            raise
        except Exception as e:
            raise NetworkError(f"dial-back from {peer}: {one_line(e)}") from e

    async def _push(self, peer: PeerID, sha: str, blob: Any) -> bool:
        await self._connect(peer)
        stub = BlobServicer.get_stub(self._p2p, peer, namespace=self.namespace)
        offer = runtime_pb2.ExpertRequest(uid=sha, metadata=_pack(count=len(blob.parts), nbytes=blob.nbytes))
        answer = _meta(await stub.rpc_offer_blob(offer))
        if answer.get("status") == "have":
            return False
        if answer.get("status") != "send":
            raise NetworkError(f"{peer} refused blob {sha[:12]}: {answer.get('reason', 'no reason given')}")

        async def upload() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            meta = _pack(count=len(blob.parts), kind=blob.kind, round=blob.round_id)
            yield runtime_pb2.ExpertRequest(uid=sha, metadata=meta)
            for part in blob.parts:
                for chunk in split_for_streaming(part, self._chunk_bytes):
                    self.traffic.add_sent(blob.kind, len(chunk.buffer))
                    yield runtime_pb2.ExpertRequest(tensors=[chunk])

        result = _meta(await stub.rpc_push_blob(upload()))
        if result.get("status") != "ok":
            raise NetworkError(f"{peer} rejected blob {sha[:12]}: {result.get('reason', 'no reason given')}")
        return True

    # --- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and release the p2pd connection. Idempotent."""
        forget_at_exit(self)
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._stop(), timeout=10)
        except Exception:
            pass  # the DHT (and its p2pd) may already be gone
        self._loop.close()

    async def _stop(self) -> None:
        try:
            await asyncio.wait_for(self._servicer.remove_p2p_handlers(self._p2p, namespace=self.namespace), 5)
        finally:
            await self._p2p.shutdown()

    def __enter__(self) -> BlobService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
