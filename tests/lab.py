"""A network lab in one machine: hosts in Linux network namespaces, shaped links, a real NAT, link cuts.

Tests and benchmarks run the real `lte-coordinator` and `lte-peer` inside it (`host.wrap(argv)`,
`host.netproc(args)` for tests/netproc.Network). Everything is built with iproute2, iptables, ebtables and tc,
plus a small helper process per delayed link direction (tests/nfqdelay.py) for delay, jitter and loss. Root
is needed.

Topology (every box is a network namespace named `ltelab-<pid>-<random>-...`; the root namespace gets none of
the lab's interfaces, routes or rules):

                      ltelab-..-inet: bridge br0, "the internet", 198.18.0.0/24 (no address of its own)
        +-------------+---------------+-------------------------+------------------------------+
        | p-coord     | p-peer1       | r-home                  | r-f-coord                    |
      [coord]       [peer1]         [nat-home] 198.18.0.x       [fwd-coord] 198.18.0.y
      198.18.0.10   198.18.0.11     MASQUERADE out; new         DNAT public :port -> host;
      lab.host()    lab.host()      inbound dropped             MASQUERADE out
                                    bridge lan 198.19.0.1       bridge lan 198.19.1.1
                                      | p-home1                   | p-coord
                                    [home1] 198.19.0.2          [coord] 198.19.1.2
                                    lab.home_host()             lab.forwarded_host(..., ports)

Every host has one link: its `eth0` (veth) to a port `p-<name>` of a bridge (the internet's, or its router's
LAN). Shaping, per direction ("up": host to bridge, "down": bridge to host):
- rate: `tc tbf` on the sending end of the veth (eth0 for up, the bridge port for down). tc is the kernel's own
  shaper; tbf is the rate limiter this kernel has.
- delay, jitter, loss: this kernel has no `sch_netem`, so iptables sends IPv4 packets to NFQUEUE and
  nfqdelay.py holds each packet for delay +- jitter (first in, first out) or drops it. Down: inside the host,
  as packets arrive on eth0 (mangle PREROUTING). Up: in the bridge's namespace, as packets enter the host's
  port (br_netfilter, mangle PREROUTING -m physdev --physdev-in), because a packet still inside the host
  belongs to its sending socket, and TCP Small Queues would then allow about 1 ms of data in flight (a
  25-ms link gave under 2 Mbit/s). No `--queue-bypass`: if a delayer died, its link would stop rather than
  silently lose its delay.
  The RTT between two hosts is the sum of the four one-way delays on the path (A up, B down, B up, A down).
- cut: ebtables DROP on the host's bridge port, both ways (`host.cut()`, `host.restore()`): the wire is
  gone, the sender sees no error (an iptables DROP inside the host would make its send calls fail with EPERM,
  which a real outage does not do), packets already past the port still arrive.

Safety: only 198.18.0.0/15 is used. No namespace has an interface out of the lab: the only devices are
loopback, veths whose both ends are lab namespaces, the bridges (multicast snooping off: it sends IGMP), and
`sink`, one end of a veth pair whose other end (`sink0`, same namespace) is down, so it discards everything
(this kernel has no dummy device). `sink` carries the default route, so that a packet to a non-lab address
(SSDP multicast to 239.255.255.250, a public IP) is routed at all and reaches iptables' OUTPUT chain, where
the chain `lab-escape` drops and counts it (FORWARD too, in routers; IPv6, which only loopback has,
likewise). `lab.escaped_packets()` reads those counters; tests assert they are zero.

Teardown (`close()`, run by the context manager on success, failure and KeyboardInterrupt (SIGINT), by a
SIGTERM handler and by atexit): SIGTERM then SIGKILL to every process the lab started (by pid), SIGKILL to
any other process still inside its namespaces (`ip netns pids`), then `ip netns del` of every namespace.
A run killed outright (SIGKILL) leaves namespaces behind; `Lab.cleanup_stale()` (run by every new Lab)
deletes the namespaces of labs whose owning process is dead (checked by pid and start time from the state
file /run/ltelab/<lab id>.json), killing the processes inside them first. Nothing is ever killed by name.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "ltelab"
LAB_NET = "198.18.0.0/15"  # RFC 2544's benchmarking range: never routed on the internet
STATE_DIR = Path("/run/ltelab")
DELAYER = Path(__file__).resolve().with_name("nfqdelay.py")
DOWN_QUEUE, UP_QUEUE_BASE = 0, 100  # NFQUEUE numbers (per namespace): host's down; bridge's 100 + host index
TBF_QUEUE_MS = 100  # how long tbf's queue is, in time at the link rate (home routers buffer at least that)
CMD_TIMEOUT_S = 30.0
TERM_GRACE_S = 5.0
NAME_RE = re.compile(r"[a-z][a-z0-9]{0,11}")  # becomes part of namespace and interface names (15 chars max)


class LabError(RuntimeError):
    """A lab command failed; the message holds the command and its stderr."""


def sh(argv: Sequence[str], *, check: bool = True, input: str | None = None,
       timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run one command (iproute2, iptables, ...), capture its output, raise LabError when it fails."""
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def lab_namespaces() -> list[str]:
    """Every network namespace on this machine whose name starts with the lab prefix (any lab, any owner)."""
    out = sh(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")]


def ns_pids(ns: str) -> list[int]:
    """Pids of the processes inside namespace `ns` (what `ip netns pids` finds: /proc/*/ns/net)."""
    r = sh(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Shape:
    """One direction of a link: one-way delay and jitter (ms, uniform in +-jitter, packets keep their order),
    loss (probability per packet) and rate (Mbit/s; None: unlimited)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"bad link shape {self}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"bad link rate {self.rate_mbit}")

    @property
    def queued(self) -> bool:
        """Whether this direction needs the NFQUEUE delayer."""
        return bool(self.delay_ms or self.jitter_ms or self.loss)


@dataclass(frozen=True)
class Pings:
    """What `Host.ping` got: echo requests sent, and the RTT (ms) of each one answered, in order."""

    sent: int
    rtts: list[float]

    @property
    def loss(self) -> float:
        return 1 - len(self.rtts) / self.sent if self.sent else 1.0


@dataclass(frozen=True)
class Measurement:
    """What `Lab.measure(a, b)` found: ping RTT from a to b (ms) and TCP bulk goodput each way (Mbit/s)."""

    rtt_min_ms: float
    rtt_median_ms: float
    rtt_mdev_ms: float
    ping_loss: float
    a_to_b_mbit: float
    b_to_a_mbit: float


@dataclass(eq=False)
class Host:
    """One lab host: a namespace with `eth0` at `ip`; `public_ip` is the address the internet sees it at (its
    router's for home and forwarded hosts). Created by Lab.host / home_host / forwarded_host."""

    lab: Lab
    name: str
    ns: str
    ip: str
    public_ip: str
    port_ns: str  # namespace of the bridge its link plugs into, and the port there
    port: str
    forwarded: tuple[int, ...] = ()
    up: Shape = field(default_factory=Shape)
    down: Shape = field(default_factory=Shape)
    index: int = 0  # the host's number in the lab (its up queue's number)
    cut_now: bool = False
    delayers: dict[str, _Delayer] = field(default_factory=dict)  # "up", "down"

    def __repr__(self) -> str:
        return f"Host({self.name} {self.ip} public {self.public_ip} ns {self.ns})"

    # ----- running things inside ------------------------------------------------------------------------------
    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace. `ip netns exec` execs the command (no fork), so the pid
        of a process started with this argv is the command's own pid."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def netproc(self, args: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments for tests/netproc.Network.start(name, **host.netproc(args)): runs `python args`
        in this host (e.g. args = ["-m", "peer.cli", "join", ...])."""
        return {"args": ["netns", "exec", self.ns, sys.executable, *args], "exe": "ip"}

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this host; the lab ends it (by pid) at teardown if it still runs."""
        proc = subprocess.Popen(self.wrap(argv), **kw)
        self.lab._started.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside this host to completion; output captured as text."""
        return sh(self.wrap(argv), check=check, timeout=timeout, input=input)

    def ping(self, ip: str, count: int = 10, interval: float = 0.05, wait_s: float = 2.0) -> Pings:
        """Send `count` echo requests to `ip`, one every `interval` s, and wait up to `wait_s` s after the last
        for replies. `ping -U`: the RTT as a program sees it (the kernel's receive timestamp is taken before
        the down-direction delay). `-w` (a deadline) rather than `-W`: ping would otherwise wait only two RTTs
        for the last reply and count a late one as lost. With `-w` ping goes on sending until `count` replies
        came; only replies to the first `count` requests are kept."""
        deadline = math.ceil(count * interval + wait_s)  # whole seconds only
        r = self.run(["ping", "-U", "-n", "-c", str(count), "-i", str(interval), "-w", str(deadline), ip],
                     check=False, timeout=deadline + 30)
        replies = {int(seq): float(ms) for seq, ms in re.findall(r"icmp_seq=(\d+) .*time=([\d.]+) ms", r.stdout)}
        return Pings(count, [ms for seq, ms in sorted(replies.items()) if seq <= count])

    # ----- the link -------------------------------------------------------------------------------------------
    def set_link(self, up: Shape | None = None, down: Shape | None = None) -> None:
        """Shape this host's link: `up` (leaving the host) and `down` (arriving; default: same as `up`). Takes
        effect for packets that arrive after it returns (packets already held keep their release time)."""
        up = up or Shape()
        down = down or up
        for shape, ns, dev in ((up, self.ns, "eth0"), (down, self.port_ns, self.port)):
            if shape.rate_mbit is None:
                sh(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)  # none there: fine
            else:
                rate_bps = shape.rate_mbit * 1e6
                burst = max(15_140, int(rate_bps / 8 * 0.002))  # 10 full packets, or 2 ms at the rate
                limit = burst + int(rate_bps / 8 * TBF_QUEUE_MS / 1000)
                sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bps:.0f}bit",
                    "burst", str(burst), "limit", str(limit)])
        for direction, shape in (("up", up), ("down", down)):
            delayer = self.delayers.get(direction)
            if delayer is None and shape.queued:
                delayer = self.delayers[direction] = self._start_delayer(direction)
            if delayer is not None:
                delayer.set(shape)
        self.up, self.down = up, down

    def _start_delayer(self, direction: str) -> _Delayer:
        """The up direction is delayed in the bridge's namespace, as packets enter its port (br_netfilter's
        PREROUTING, physdev match): there they no longer belong to the sending socket. Held inside the host,
        they would count against TCP Small Queues' ~1 ms budget and cap a 20 Mbit/s link at about 2 Mbit/s.
        The down direction is delayed inside the host, as packets arrive on eth0 (PREROUTING)."""
        if direction == "up":
            return _Delayer(self.lab, self.port_ns, UP_QUEUE_BASE + self.index,
                            ["-t", "mangle", "-A", "PREROUTING", "-m", "physdev", "--physdev-in", self.port])
        return _Delayer(self.lab, self.ns, DOWN_QUEUE, ["-t", "mangle", "-A", "PREROUTING", "-i", "eth0"])

    def cut(self) -> None:
        """Cut the link: nothing passes either way until restore() (ebtables DROP on the bridge port)."""
        if not self.cut_now:
            self._ebtables("-A")
            self.cut_now = True

    def restore(self) -> None:
        """Undo cut(): the link passes again, shaped as before."""
        if self.cut_now:
            self._ebtables("-D")
            self.cut_now = False

    def _ebtables(self, op: str) -> None:
        for chain, flag in (("FORWARD", "-i"), ("FORWARD", "-o"), ("INPUT", "-i"), ("OUTPUT", "-o")):
            sh(["ip", "netns", "exec", self.port_ns, "ebtables", op, chain, flag, self.port, "-j", "DROP"])

    # ----- safety ---------------------------------------------------------------------------------------------
    def escaped(self) -> int:
        """Packets this host tried to send (or route) outside 198.18.0.0/15, all dropped."""
        return _escaped(self.ns)


class _Delayer:
    """One nfqdelay.py process bound to NFQUEUE `queue` in namespace `ns`, and the iptables rule (`match`)
    that sends packets to it, added once the process is bound (there is no --queue-bypass)."""

    def __init__(self, lab: Lab, ns: str, queue: int, match: list[str]):
        self.ns, self.queue = ns, queue
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(DELAYER), str(queue)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lab._started.append(self.proc)
        lab._delayers.append(self.proc)
        lab._save_state()
        if (line := self._line()) != "ready":
            raise LabError(f"delayer in {ns} did not start: {line!r} {self.proc.stderr.read().decode()[-2000:]}")
        sh(["ip", "netns", "exec", ns, "iptables", "-w", *match, "-j", "NFQUEUE", "--queue-num", str(queue)])

    def set(self, shape: Shape) -> None:
        """Apply `shape`'s delay, jitter and loss; returns once the delayer has applied them."""
        assert self.proc.stdin is not None
        cmd = {"queue": self.queue, "delay_ms": shape.delay_ms, "jitter_ms": shape.jitter_ms, "loss": shape.loss}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        if (line := self._line()) != "ok":
            raise LabError(f"delayer in {self.ns} answered {line!r} to {cmd}")

    def _line(self, timeout: float = CMD_TIMEOUT_S) -> str:
        """One line from the delayer's stdout, or '' if it ended or said nothing within `timeout`."""
        assert self.proc.stdout is not None
        fd, out, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            byte = os.read(fd, 1)  # one byte at a time: nothing of a later line is consumed here
            if not byte:
                return ""
            out += byte
        return out.decode().strip()


def _escaped(ns: str) -> int:
    total = 0
    for tool in ("iptables", "ip6tables"):
        out = sh(["ip", "netns", "exec", ns, tool, "-w", "-L", "lab-escape", "-n", "-v", "-x"]).stdout
        rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
        total += sum(int(row[0]) for row in rows)
    return total


class Lab:
    """The lab: a context manager that owns its namespaces and processes; see the module docstring."""

    def __init__(self) -> None:
        self.id = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.inet = f"{self.id}-inet"
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, tuple[str, str, str, int]] = {}  # NAT router -> (ns, WAN ip, LAN /24, next host)
        self.namespaces: list[str] = []  # in creation order
        self._started: list[subprocess.Popen[Any]] = []
        self._delayers: list[subprocess.Popen[Any]] = []
        self._next_public = 10  # 198.18.0.x handed out from here
        self._next_lan = 0  # 198.19.k.0/24 handed out from here
        self._closed = False
        self._old_sigterm: Any = None

    # ----- lifetime -------------------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            Lab.cleanup_stale()
        except LabError as e:  # someone else's leftovers must not stop this lab
            warnings.warn(f"lab: stale namespaces not cleaned up: {e}", stacklevel=2)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._save_state()
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            self._new_ns(self.inet, bridge=True)
            self._ip(self.inet, "link add br0 type bridge mcast_snooping 0", "link set br0 up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process the lab started and everything else inside its namespaces (by pid), then delete
        the namespaces. Idempotent. SIGINT/SIGTERM arriving meanwhile are held until it is done."""
        if self._closed:
            return
        self._closed = True
        held: list[int] = []
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, lambda s, f: held.append(s))
        errors: list[str] = []
        try:
            for proc in self._started:  # delayers exit on stdin EOF; everything else gets SIGTERM
                if proc.poll() is None:
                    if proc in self._delayers and proc.stdin is not None:
                        proc.stdin.close()
                    else:
                        proc.terminate()
            deadline = time.monotonic() + TERM_GRACE_S
            for proc in self._started:
                try:
                    proc.wait(max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
            for ns in reversed(self.namespaces):
                try:
                    _empty_and_delete(ns)
                except (LabError, subprocess.TimeoutExpired) as e:
                    errors.append(str(e))
            (STATE_DIR / f"{self.id}.json").unlink(missing_ok=True)
        finally:
            atexit.unregister(self.close)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
        if held:
            raise KeyboardInterrupt if signal.SIGINT in held else SystemExit(128 + signal.SIGTERM)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Delete the namespaces (and kill the processes inside them) of labs whose owner is dead: a run killed
        with SIGKILL, or a crashed interpreter. A namespace whose owner still runs is never touched."""
        removed = []
        for ns in lab_namespaces():
            m = re.match(rf"({PREFIX}-(\d+)-[0-9a-f]+)-", ns)
            if not m or _owner_alive(m.group(1), int(m.group(2))):
                continue
            _empty_and_delete(ns)
            removed.append(ns)
        if STATE_DIR.is_dir():
            for state in STATE_DIR.glob(f"{PREFIX}-*.json"):
                m = re.match(rf"({PREFIX}-(\d+)-[0-9a-f]+)\.json$", state.name)
                if m and not _owner_alive(m.group(1), int(m.group(2))):
                    state.unlink(missing_ok=True)
        return removed

    def _save_state(self) -> None:
        state = {"pid": os.getpid(), "start": _start_time(os.getpid()), "namespaces": self.namespaces,
                 "pids": [p.pid for p in self._started]}
        tmp = STATE_DIR / f"{self.id}.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.rename(STATE_DIR / f"{self.id}.json")

    # ----- building -------------------------------------------------------------------------------------------
    def _ip(self, ns: str, *cmds: str) -> None:
        """iproute2 commands inside `ns`, one batch (`ip -n NS -batch -`)."""
        sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")

    def _new_ns(self, ns: str, *, bridge: bool = False, forward: bool = False) -> None:
        self.namespaces.append(ns)  # before creating it: a failure half-way still gets it deleted
        self._save_state()
        sh(["ip", "netns", "add", ns])
        # The sink: a veth pair inside this namespace whose other end (sink0) stays down, so whatever is sent
        # on it is discarded (this kernel has no dummy device).
        self._ip(ns, "link set lo up", "link add sink type veth peer name sink0", "link set sink up",
                 "route add default dev sink")
        # IPv6 only on loopback (interfaces made from now on have it off). A namespace with a bridge passes
        # bridged IPv4 through iptables (br_netfilter), for the up direction's NFQUEUE; routers forward.
        sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-e", "-w", "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv6.conf.sink.disable_ipv6=1",
            "net.ipv6.conf.sink0.disable_ipv6=1", f"net.bridge.bridge-nf-call-iptables={int(bridge)}",
            f"net.ipv4.ip_forward={int(forward)}"])
        rules = "*filter\n:lab-escape - [0:0]\n-A lab-escape -j DROP\n-A OUTPUT -o lo -j ACCEPT\n"
        sh(["ip", "netns", "exec", ns, "iptables-restore"],
           input=rules + f"-A OUTPUT ! -d {LAB_NET} -j lab-escape\n-A FORWARD ! -d {LAB_NET} -j lab-escape\n"
                         "COMMIT\n")
        sh(["ip", "netns", "exec", ns, "ip6tables-restore"],
           input=rules + "-A OUTPUT -j lab-escape\n-A FORWARD -j lab-escape\nCOMMIT\n")

    def _plug(self, ns: str, bridge_ns: str, bridge: str, port: str, dev: str, cidr: str) -> None:
        """A veth from `ns` (named `dev`, address `cidr`) to port `port` of `bridge` in `bridge_ns`."""
        self._ip(bridge_ns, f"link add {port} type veth peer name {dev} netns {ns}",
                 f"link set {port} master {bridge}", f"link set {port} up")
        self._ip(ns, f"addr add {cidr} dev {dev}", f"link set {dev} up")

    def _public_ip(self) -> str:
        ip, self._next_public = f"198.18.0.{self._next_public}", self._next_public + 1
        if self._next_public > 254:
            raise LabError("the lab's internet is full")
        return ip

    def _check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name) or name in self.hosts or name == "inet":
            raise ValueError(f"host name {name!r}: taken, or not [a-z][a-z0-9]{{0,11}}")

    def _router(self, ns: str, wan_port: str, forward: Sequence[tuple[int, str]] = ()) -> tuple[str, str]:
        """A NAT router namespace: `wan` on the internet, bridge `lan` 198.19.k.1/24; returns (WAN ip, LAN
        prefix). Outbound is masqueraded; inbound is dropped unless it belongs to a connection from inside or
        matches a forward (port, private ip), forwarded for TCP and UDP."""
        k, self._next_lan = self._next_lan, self._next_lan + 1
        lan, wan_ip = f"198.19.{k}", self._public_ip()
        self._new_ns(ns, bridge=True, forward=True)
        self._plug(ns, self.inet, "br0", wan_port, "wan", f"{wan_ip}/24")
        self._ip(ns, "link add lan type bridge mcast_snooping 0", f"addr add {lan}.1/24 dev lan", "link set lan up")
        dnat = "".join(f"-A PREROUTING -i wan -d {wan_ip} -p {proto} --dport {port} -j DNAT "
                       f"--to-destination {ip}:{port}\n" for port, ip in forward for proto in ("tcp", "udp"))
        sh(["ip", "netns", "exec", ns, "iptables-restore", "--noflush"], input=(
            "*nat\n" + dnat + "-A POSTROUTING -o wan -j MASQUERADE\nCOMMIT\n"
            "*filter\n"
            "-A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
            + ("-A FORWARD -i wan -m conntrack --ctstate DNAT -j ACCEPT\n" if forward else "") +
            "-A FORWARD -i wan -j DROP\n"
            "-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
            "-A INPUT -i wan -j DROP\nCOMMIT\n"))
        return wan_ip, lan

    def _add_host(self, name: str, ns: str, ip: str, public_ip: str, port_ns: str, bridge: str,
                  gateway: str | None, up: Shape | None, down: Shape | None,
                  forwarded: tuple[int, ...] = ()) -> Host:
        self._new_ns(ns)
        port = f"p-{name}"
        self._plug(ns, port_ns, bridge, port, "eth0", f"{ip}/24")
        if gateway:
            self._ip(ns, f"route add {LAB_NET} via {gateway}")
        host = Host(self, name, ns, ip, public_ip, port_ns, port, forwarded, index=len(self.hosts))
        self.hosts[name] = host
        host.set_link(up, down)
        return host

    def host(self, name: str, up: Shape | None = None, down: Shape | None = None) -> Host:
        """A host on the internet (198.18.0.0/24), reachable by every other host. `down` defaults to `up`."""
        self._check_name(name)
        ip = self._public_ip()
        return self._add_host(name, f"{self.id}-{name}", ip, ip, self.inet, "br0", None, up, down)

    def home_host(self, name: str, up: Shape | None = None, down: Shape | None = None,
                  router: str = "home") -> Host:
        """A host on the LAN of NAT router `router` (created on first use; LAN 198.19.k.0/24): it can open
        connections to the internet, seen there from the router's address, but nobody outside can open one to
        it. Hosts naming the same router share its LAN. The shaped link is the one between host and router."""
        self._check_name(name)
        if router not in self.routers:
            if not NAME_RE.fullmatch(router):
                raise ValueError(f"router name {router!r}")
            ns = f"{self.id}-nat-{router}"
            wan_ip, lan = self._router(ns, f"r-{router}")
            self.routers[router] = (ns, wan_ip, lan, 2)
        ns, wan_ip, lan, nxt = self.routers[router]
        self.routers[router] = (ns, wan_ip, lan, nxt + 1)
        return self._add_host(name, f"{self.id}-{name}", f"{lan}.{nxt}", wan_ip, ns, "lan", f"{lan}.1", up, down)

    def forwarded_host(self, name: str, ports: int | Iterable[int], up: Shape | None = None,
                       down: Shape | None = None) -> Host:
        """A host on a private LAN behind its own router, which forwards its public address's `ports` (TCP and
        UDP) to the same ports of the host, and masquerades the host's outbound traffic: a cloud VM with a
        public IP in front of it. `host.public_ip:port` is how the internet reaches it."""
        self._check_name(name)
        ports = (ports,) if isinstance(ports, int) else tuple(ports)
        lan_ip = f"198.19.{self._next_lan}.2"
        wan_ip, lan = self._router(f"{self.id}-fwd-{name}", f"r-f-{name}"[:15], [(p, lan_ip) for p in ports])
        assert lan_ip == f"{lan}.2"
        return self._add_host(name, f"{self.id}-{name}", lan_ip, wan_ip, f"{self.id}-fwd-{name}", "lan",
                              f"{lan}.1", up, down, ports)

    # ----- looking --------------------------------------------------------------------------------------------
    def escaped_packets(self) -> dict[str, int]:
        """For every lab namespace (hosts by name, routers and the bridge by namespace), the packets it tried
        to send or forward outside 198.18.0.0/15; all were dropped. Tests assert every count is zero."""
        names = {h.ns: h.name for h in self.hosts.values()}
        return {names.get(ns, ns): _escaped(ns) for ns in self.namespaces}

    def measure(self, a: Host, b: Host, seconds: float = 2.5, pings: int = 20) -> Measurement:
        """Measure the path between two hosts as an application sees it: `a.ping(b.ip)`, then a TCP bulk
        transfer each way for `seconds`, goodput counted after the first 0.5 s (slow start). a opens every
        connection, so a may be behind a NAT."""
        ping = a.ping(b.ip, pings)
        rtts = ping.rtts
        server = b.popen([sys.executable, "-c", _BULK, "serve", str(seconds)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            if not select.select([server.stdout], [], [], CMD_TIMEOUT_S)[0]:
                raise LabError("bulk server did not start")
            port = server.stdout.readline().strip()
            rates = {}
            for direction in ("up", "down"):
                r = a.run([sys.executable, "-c", _BULK, direction, b.ip, port, str(seconds)], timeout=seconds + 60)
                rates[direction] = float(r.stdout.strip())
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(10)
            server.stdout.close()
        return Measurement(min(rtts, default=float("nan")), statistics.median(rtts) if rtts else float("nan"),
                           statistics.pstdev(rtts) if rtts else float("nan"), ping.loss,
                           rates["up"], rates["down"])


# A TCP bulk transfer: `serve SECONDS` (prints its port, serves two transfers), `up|down IP PORT SECONDS`
# (prints the goodput in Mbit/s of the data that went a->b (up) or b->a (down), measured at the receiver).
_BULK = r"""
import socket, sys, time
WARMUP = 0.5
def receive(conn):
    marks = []
    total = 0
    while True:
        data = conn.recv(1 << 17)
        if not data:
            break
        total += len(data)
        marks.append((time.monotonic(), total))
    t0 = marks[0][0] + WARMUP
    start = next(m for m in marks if m[0] >= t0) if marks[-1][0] > t0 else marks[0]
    return (marks[-1][1] - start[1]) * 8 / 1e6 / max(1e-6, marks[-1][0] - start[0])
def send(conn, seconds):
    chunk = b"x" * (1 << 16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
mode = sys.argv[1]
if mode == "serve":
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(2)
    print(srv.getsockname()[1], flush=True)
    for _ in range(2):
        conn, _ = srv.accept()
        if conn.recv(1) == b"u":
            conn.sendall(b"%.3f\n" % receive(conn))
        else:
            send(conn, float(sys.argv[2]))
            conn.recv(1)
        conn.close()
else:
    conn = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    conn.settimeout(None)
    if mode == "up":
        conn.sendall(b"u")
        send(conn, float(sys.argv[4]))
        print(conn.makefile().readline().strip())
    else:
        conn.sendall(b"d")
        print("%.3f" % receive(conn))
"""


def _owner_alive(lab_id: str, pid: int) -> bool:
    """Whether the process that made lab `lab_id` still runs: same pid and, when its state file says, the same
    start time (a reused pid is not the owner). Without a state file a live pid counts as the owner."""
    started = _start_time(pid)
    if started is None:
        return False
    try:
        recorded = json.loads((STATE_DIR / f"{lab_id}.json").read_text()).get("start")
    except (OSError, ValueError):
        return True
    return recorded is None or recorded == started


def _empty_and_delete(ns: str) -> None:
    """SIGKILL every process inside `ns` (by pid, until none is left), then delete the namespace."""
    deadline = time.monotonic() + 10.0
    while pids := ns_pids(ns):
        if time.monotonic() > deadline:
            raise LabError(f"{ns}: processes {pids} would not die")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    r = sh(["ip", "netns", "del", ns], check=False)
    if r.returncode != 0 and ns in lab_namespaces():
        raise LabError(f"ip netns del {ns}: {r.stderr.strip()}")


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds `with Lab()` like Ctrl+C does, so teardown runs
