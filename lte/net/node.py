"""Starting and stopping this application's hivemind DHT node.

`start_dht` adds what hivemind leaves to the caller: addresses are checked before any process starts, a
failed or slow start raises `NetworkError` within `startup_timeout + BOOTSTRAP_MARGIN_S` seconds and leaves
no DHT or p2pd process behind, and the node dies with its parent instead of lingering as an orphan.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from lte.net.errors import NetworkError, one_line
from lte.net.procs import (
    forget_at_exit,
    install_signal_handlers,
    kill_process_group,
    prepare_hivemind_child,
    stop_at_exit,
    use_fork_start_method,
)
from lte.net.records import default_validators

__all__ = [
    "BOOTSTRAP_MARGIN_S", "check_node_inputs", "install_signal_handlers", "prepare_process", "reconnect",
    "shutdown_dht", "shutdown_node", "start_dht", "use_fork_start_method", "visible_maddrs",
]

# Time allowed on top of p2pd's startup_timeout for the DHT to ping its initial peers (hivemind's
# wait_timeout is 3 s) and for the child process to report back.
BOOTSTRAP_MARGIN_S = 10.0
RECONNECT_DIAL_S = 10.0  # how long `reconnect` dials before it lets the ping say whether the node answers
# How long a DHT process gets to exit on its own before it is killed.
EXIT_GRACE_S = 3.0
# How long a node keeps asking for an identity that another live node still holds. A peer restarted right
# after a crash finds its old p2pd alive for up to ORPHAN_POLL_S plus its shutdown; a true duplicate still
# fails, only later.
IDENTITY_WAIT_S = 20.0
IDENTITY_TAKEN = "is already taken by another peer"  # hivemind's P2PDaemonError text


class _AppDHT(hivemind.DHT):
    """hivemind's DHT whose process leads its own process group (shared with its p2pd) and dies with its parent,
    and whose p2pd daemons map no ports by UPnP unless asked to (`upnp`)."""

    def __init__(self, *args: Any, upnp: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, nat_port_map=upnp, **kwargs)
        self._upnp = upnp

    def run(self) -> None:
        prepare_hivemind_child(own_process_group=True)
        _default_nat_port_map(self._upnp)
        super().run()


def _default_nat_port_map(upnp: bool) -> None:
    """Make `upnp` the default of every p2pd this process starts.

    p2pd's UPnP port mapping (hivemind's default, `nat_port_map=True`) multicasts SSDP discovery to
    239.255.255.250 from every interface. The node's own daemon gets our value through the DHT's keyword
    arguments, but hivemind also starts a throwaway daemon to check that an identity file is free
    (`P2P.is_identity_taken`) without passing it on; only a changed default reaches that one. Runs in the DHT's
    own child process, so nothing else in the program is affected.
    """
    from hivemind.p2p import P2P

    create = P2P.create.__func__
    if getattr(create, "_lte_upnp", None) == upnp:
        return

    async def create_without_upnp(cls: type, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("nat_port_map", upnp)
        return await create(cls, *args, **kwargs)

    create_without_upnp._lte_upnp = upnp  # type: ignore[attr-defined]
    P2P.create = classmethod(create_without_upnp)  # type: ignore[method-assign]


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] | None = None,
    validators: Sequence[RecordValidatorBase] | None = None,
    startup_timeout: float = 15.0,
    upnp: bool = False,
    **dht_kwargs: Any,
) -> hivemind.DHT:
    """Start a DHT node listening on `host:port` (port 0 = any) and join the swarm through `initial_peers`.

    `initial_peers` are full multiaddrs with `/p2p/<peer id>` (what `visible_maddrs` prints); none starts a
    new swarm. `identity_path` keeps the peer id stable across restarts (the file is created if missing).
    `client_mode` is for peers that cannot accept connections (NAT). `upnp` lets p2pd ask the home router for a
    port mapping (UPnP/NAT-PMP): off by default, because its discovery multicasts beyond this machine (a
    volunteer opts in with --upnp). `validators` default to
    `default_validators()`; every node of a run must use the same ones. Extra keyword arguments go to
    `hivemind.DHT` (e.g. `use_auto_relay=True`).

    An identity that another live node holds is asked for again for up to IDENTITY_WAIT_S: the node of a
    peer that crashed a moment ago lingers that long.

    Raises NetworkError, with a one-line reason, on a malformed address or when the node cannot start or
    reach any initial peer. Stop the node with `shutdown_dht`.
    """
    peers, announce = check_node_inputs(initial_peers, announce_maddrs or (), identity_path)
    give_up = time.monotonic() + IDENTITY_WAIT_S
    while True:
        try:
            return _start_once(peers, announce, host, port, identity_path, client_mode, validators, startup_timeout,
                               upnp, dht_kwargs)
        except NetworkError as e:
            if IDENTITY_TAKEN not in str(e):
                raise
            if time.monotonic() >= give_up:
                raise NetworkError(f"{e} (still after {IDENTITY_WAIT_S:.0f} s: is another process running with "
                                   f"this identity file?)") from e
            time.sleep(1.0)


def _start_once(peers: list[str], announce: list[str], host: str, port: int, identity_path: str | None,
                client_mode: bool, validators: Sequence[RecordValidatorBase] | None, startup_timeout: float,
                upnp: bool, dht_kwargs: dict[str, Any]) -> hivemind.DHT:
    dht = _AppDHT(
        initial_peers=peers or None,
        start=False,
        host_maddrs=[_host_maddr(host, port)],
        announce_maddrs=announce or None,
        identity_path=identity_path,
        client_mode=client_mode,
        record_validators=list(validators) if validators is not None else default_validators(),
        startup_timeout=startup_timeout,
        upnp=upnp,
        **dht_kwargs,
    )
    try:
        dht.run_in_background(await_ready=True, timeout=startup_timeout + BOOTSTRAP_MARGIN_S)
    except Exception as e:
        _force_stop(dht)
        how = f" via {', '.join(peers)}" if peers else ""
        if isinstance(e, TimeoutError):
            reason = f"not ready within {startup_timeout + BOOTSTRAP_MARGIN_S:.0f} s"
        else:
            reason = one_line(e)
        raise NetworkError(f"cannot start DHT node{how}: {reason}") from e
    except BaseException:
        _force_stop(dht)
        raise
    stop_at_exit(dht, shutdown_dht)
    return dht


def check_node_inputs(initial_peers: Sequence[str] = (), announce_maddrs: Sequence[str] = (),
                      identity_path: str | None = None) -> tuple[list[str], list[str]]:
    """What `start_dht` checks before it starts any process, for a program to call first and refuse bad input at
    once. Returns the initial peers and announce addresses, normalised; raises NetworkError with a one-line reason.
    """
    peers = [_parse_peer_maddr(item) for item in initial_peers]
    announce = [_parse_maddr(item, "announce address") for item in announce_maddrs]
    if identity_path is not None and os.path.isfile(identity_path):  # a missing one is created
        try:
            with open(identity_path, "rb") as f:
                PeerID.from_identity(f.read())
        except Exception as e:  # noqa: BLE001 (protobuf and crypto errors alike mean: not an identity file)
            # otherwise p2pd fails on it, after a start and with a protobuf message
            raise NetworkError(f"{identity_path} is not a libp2p identity file: {one_line(e)}") from None
    return peers, announce


async def _dial_and_ping(maddr: str, _dht: hivemind.DHT, node: Any) -> bool:
    # runs inside the DHT process (via DHT.run_coroutine)
    addr = Multiaddr(maddr)
    peer = PeerID.from_base58(addr["p2p"])
    with suppress(Exception):  # already connected, or not reachable: the ping below tells
        # bounded: over a link that drops every packet a dial would wait for TCP's own give-up, minutes
        await asyncio.wait_for(node.p2p._client.connect(peer, [addr.decapsulate(Multiaddr(f"/p2p/{addr['p2p']}"))]),
                               RECONNECT_DIAL_S)
    return await node.protocol.call_ping(peer) is not None


def reconnect(dht: hivemind.DHT, maddr: str) -> bool:
    """Dial the node at `maddr` (ending in /p2p/<peer id>) and ping it, so both have each other in their DHT
    routing tables again. Returns whether it answered.

    hivemind drops a node from its routing table after one request it did not answer and never looks for it
    again, and a restarted node starts with an empty table: a peer whose link to the swarm was a coordinator
    that restarted would otherwise never meet it again (it would read stale records forever).
    """
    try:
        return bool(dht.run_coroutine(partial(_dial_and_ping, maddr)))
    except Exception:
        return False


def announceable(maddrs: list[str], coordinator_maddr: str) -> list[str]:
    """The addresses worth announcing to a run whose coordinator listens at `coordinator_maddr`: a node listening on
    every interface also reports its loopback address, which other machines would dial on themselves (and might
    even reach something there); keep it only for a coordinator on loopback (one machine: tests, a lab)."""
    if "/ip4/127." in coordinator_maddr or "/ip6/::1/" in coordinator_maddr:
        return maddrs
    public = [a for a in maddrs if not (a.startswith("/ip4/127.") or a.startswith("/ip6/::1/"))]
    return public or maddrs


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Addresses other nodes can use to join through `dht` (each ends with /p2p/<peer id>; pass as --dht)."""
    peer = dht.peer_id.to_base58()
    addrs = [str(item) for item in dht.get_visible_maddrs()]
    return [addr if "/p2p/" in addr else f"{addr}/p2p/{peer}" for addr in addrs]


def shutdown_dht(dht: hivemind.DHT) -> None:
    """Stop `dht` and its p2pd for sure (hivemind's own shutdown gives up after a grace period)."""
    forget_at_exit(dht)
    if dht.is_alive():
        dht.shutdown()
    _force_stop(dht)


def _force_stop(dht: hivemind.DHT) -> None:
    if dht.pid is None:  # never started
        return
    # Give the child time to end by itself first: a child killed while it reports to its parent can die
    # holding hivemind's global MPFuture lock (shared by every hivemind process forked from this one), and
    # then every later DHT or averager start in this program hangs.
    dht.join(EXIT_GRACE_S)
    if dht.is_alive():
        dht.terminate()
        dht.join(EXIT_GRACE_S)
    kill_process_group(dht.pid)  # its p2pd, or the temporary p2pd hivemind starts to check identity_path


def _parse_maddr(text: str, what: str) -> str:
    try:
        return str(Multiaddr(str(text)))
    except Exception as e:
        raise NetworkError(f"malformed {what} {text!r}: {one_line(e)}") from e


def _parse_peer_maddr(text: str) -> str:
    addr = _parse_maddr(text, "peer address")
    try:
        PeerID.from_base58(Multiaddr(addr)["p2p"])
    except Exception as e:
        raise NetworkError(f"peer address {text!r} must end with /p2p/<peer id>: {one_line(e)}") from e
    return addr


def _host_maddr(host: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as e:
        raise NetworkError(f"host must be an IPv4 or IPv6 address, got {host!r}") from e
    if not 0 <= port <= 65535:
        raise NetworkError(f"port must be in 0..65535, got {port}")
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def shutdown_node(*services: Any, dht: hivemind.DHT | None) -> None:
    """Stop a program's hivemind parts in the safe order: services and averagers first, then the DHT.

    Each part is stopped even if an earlier one fails: the point is that nothing survives the program.
    """
    for part in services:
        if part is None:
            continue
        try:
            (part.shutdown if hasattr(part, "shutdown") else part.close)()
        except Exception:
            pass
    if dht is not None:
        shutdown_dht(dht)


def prepare_process() -> None:
    """What every program that runs hivemind does first: fork, dependable signals, routine hivemind noise muted."""
    import logging

    use_fork_start_method()
    install_signal_handlers()
    # hivemind logs an ERROR with a traceback whenever matchmaking finds no group, which in a run is routine
    # (a round nobody else joined); our own code reports what matters in one line.
    for name in ("hivemind.averaging.averager", "hivemind.averaging.matchmaking"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # p2pd's INFO lines ("Checking that identity ... is not used") would be a second stderr line of a failed start
    logging.getLogger("hivemind.p2p.p2p_daemon").setLevel(logging.WARNING)
    sys.unraisablehook = partial(_quiet_step_control_finalizer, sys.unraisablehook)
    logging.getLogger("hivemind.dht.dht").addFilter(_drop_request_of_an_exiting_sender)


def _drop_request_of_an_exiting_sender(record: Any) -> bool:
    """False for exactly one record: hivemind's DHT process (`DHT.run`'s `_run`) logging, with a traceback, that it
    could not read a request from its pipe because the connection was reset. That happens when our process exits
    (SIGTERM) while a DHT call is in flight: torch's file-descriptor hand-over of the call's future is cut off with the
    sender. Nothing is lost (the caller is gone), and CI saw the traceback after a clean exit. Every other record is
    kept."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.funcName == "_run" and isinstance(exc, (ConnectionError, EOFError)))


def _quiet_step_control_finalizer(default: Any, unraisable: Any) -> None:
    """hivemind's StepControl.__del__ reads shared state over a pipe that may already be closed at shutdown, and the
    EOFError it raises there is printed as a traceback after a clean exit (CI saw it on SIGINT). Nothing is lost:
    the step it would cancel belongs to a process that is ending. Every other unraisable exception is printed."""
    where = getattr(unraisable.object, "__qualname__", "")
    if where == "StepControl.__del__" and isinstance(unraisable.exc_value, (EOFError, OSError)):
        return
    default(unraisable)
