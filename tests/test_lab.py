"""The network lab itself (tests/lab.py): shaped links measure what they were set to, the NAT lets connections
out and none in, the port-forwarding router forwards, a cut link passes nothing until restored, nothing leaves
the lab (and what tries is counted), and teardown leaves no namespace and no process: after success, after an
exception, after SIGINT or SIGTERM, and (through cleanup_stale) after the owner was killed outright.

Real namespaces, real packets; root is needed (CI runs as root). Each test has a timeout; every test checks
that no namespace of this process's labs is left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import PREFIX, Host, Lab, Shape, lab_namespaces, ns_pids

TESTS = Path(__file__).resolve().parent

# A TCP client: connect to IP PORT within TIMEOUT s; prints "ok <the server's view of our address>" or the error.
CONNECT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("ok", c.recv(100).decode())
except OSError as e:
    print(type(e).__name__)
"""
# A TCP server on PORT: tells each client its address as seen here; prints "listening" when ready.
SERVE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(addr[0].encode())
    c.close()
"""


def mine(pid: int | None = None) -> list[str]:
    """Lab namespaces made by process `pid` (default: this one); other processes' labs are none of ours."""
    return [ns for ns in lab_namespaces() if ns.startswith(f"{PREFIX}-{pid or os.getpid()}-")]


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serve(host: Host, port: int) -> subprocess.Popen[str]:
    proc = host.popen([sys.executable, "-c", SERVE, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def connect(host: Host, ip: str, port: int, timeout: float = 5.0) -> str:
    return host.run([sys.executable, "-c", CONNECT, ip, str(port), str(timeout)]).stdout.strip()


@pytest.fixture(autouse=True)
def no_namespace_left():
    yield
    assert mine() == [], "a lab namespace was left behind"


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab
        assert all(n == 0 for n in lab.escaped_packets().values()), lab.escaped_packets()


@pytest.mark.timeout(60)
def test_shaped_link_measures_its_settings(lab):
    a = lab.host("a", Shape(delay_ms=25, rate_mbit=20))
    b = lab.host("b")
    m = lab.measure(a, b, seconds=2.0)
    assert m.ping_loss == 0
    assert 50 <= m.rtt_min_ms <= 56, m  # 25 ms each way; the delayer adds no less, little more when idle
    assert m.rtt_median_ms <= 100, m  # a busy machine delays single packets by tens of ms (docs/lab.md)
    assert 15 <= m.a_to_b_mbit <= 25 and 15 <= m.b_to_a_mbit <= 25, m  # 20 Mbit/s within 25 %

    # Jitter and loss: 20 % loss each way leaves 0.8 * 0.8 = 64 % of echoes (sd 4 % over 150 pings).
    a.set_link(Shape(delay_ms=25, jitter_ms=5, loss=0.2))
    pings = a.ping(b.ip, count=150, interval=0.01)
    rtts = pings.rtts
    assert 0.18 <= pings.loss <= 0.55, pings.loss
    assert min(rtts) >= 40 and max(rtts) - min(rtts) >= 3, (min(rtts), max(rtts))  # 50 +- 10 ms, spread out

    a.set_link(Shape())  # unshaped again: the delayers stay, with nothing to do (but wait for the CPU)
    assert min(a.ping(b.ip, count=5).rtts) < 5


@pytest.mark.timeout(60)
def test_nat_lets_connections_out_and_none_in(lab):
    server = lab.host("server")
    home = lab.home_host("home1")
    assert home.ip.startswith("198.19.") and home.public_ip.startswith("198.18.0.")
    serve(server, 7000)
    assert connect(home, server.ip, 7000) == f"ok {home.public_ip}"  # out, masqueraded
    serve(home, 7001)
    assert connect(home, "127.0.0.1", 7001) == "ok 127.0.0.1"  # it does listen
    assert connect(server, home.public_ip, 7001, timeout=1.0) == "TimeoutError"  # new inbound: router drops it
    assert connect(server, home.ip, 7001, timeout=1.0) == "TimeoutError"  # the private address: no route
    home.set_link(Shape(delay_ms=10))  # shaping works through the router (its LAN bridge delays the up way)
    assert 20 <= min(home.ping(server.ip, count=5).rtts) <= 26


@pytest.mark.timeout(60)
def test_forwarded_host_is_reachable_at_its_public_port(lab):
    coord = lab.forwarded_host("coord", 31337)
    peer = lab.host("peer")
    serve(coord, 31337)
    serve(coord, 31338)
    assert coord.public_ip != coord.ip and coord.forwarded == (31337,)
    assert connect(peer, coord.public_ip, 31337) == f"ok {peer.ip}"  # forwarded; the source is kept
    assert connect(peer, coord.public_ip, 31338, timeout=1.0) == "TimeoutError"  # only the forwarded port
    serve(peer, 7000)
    assert connect(coord, peer.ip, 7000) == f"ok {coord.public_ip}"  # outbound is masqueraded


@pytest.mark.timeout(60)
def test_cut_link_passes_nothing_until_restored(lab):
    a = lab.host("a", Shape(delay_ms=5))
    b = lab.host("b")
    assert a.ping(b.ip, count=3).loss == 0
    a.cut()
    assert a.ping(b.ip, count=3, wait_s=0.5).rtts == []
    assert b.ping(a.ip, count=3, wait_s=0.5).rtts == []
    serve(b, 7000)
    assert connect(a, b.ip, 7000, timeout=1.0) == "TimeoutError"  # silently: no error from the sender's stack
    a.restore()
    # (an echo may be lost right after the restore, while ARP, which failed during the cut, resolves again)
    assert len(a.ping(b.ip, count=4).rtts) >= 3 and len(b.ping(a.ip, count=4).rtts) >= 3
    assert connect(a, b.ip, 7000) == f"ok {a.ip}"


@pytest.mark.timeout(60)
def test_packets_to_outside_the_lab_are_dropped_and_counted():
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    with Lab() as lab:
        check_escapes(lab, root_links)


def check_escapes(lab: Lab, root_links: str) -> None:
    a = lab.host("a", Shape(delay_ms=5))
    home = lab.home_host("home1")
    send = ("import socket, sys\nfor ip in sys.argv[1:]:\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    try:\n        s.sendto(b'M-SEARCH', (ip, 1900))\n        print('sent')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n")
    # SSDP's multicast group (what p2pd's UPnP sends) and a public address (TEST-NET-3).
    assert a.run([sys.executable, "-c", send, "239.255.255.250", "203.0.113.1"]).stdout.split() == \
        ["PermissionError"] * 2
    assert home.run([sys.executable, "-c", send, "203.0.113.1"]).stdout.split() == ["PermissionError"]
    escaped = lab.escaped_packets()
    assert escaped.pop("a") == 2 and escaped.pop("home1") == 1 and set(escaped.values()) == {0}, escaped
    # They could not have left anyway: the root namespace gained no interface, and inside the lab every device
    # is loopback, the sink pair, a bridge, or a veth whose other end is in a lab namespace of this lab;
    # a non-lab destination routes to the sink, whose other end is down.
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == root_links
    for ns in lab.namespaces:
        for line in subprocess.run(["ip", "-n", ns, "-o", "-d", "link"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            assert dev in ("lo", "sink", "sink0", "br0", "lan", "eth0", "wan") or dev[:2] in ("p-", "r-"), line
            if "veth" in line and dev not in ("sink", "sink0"):
                assert f"link-netns {lab.id}-" in line, line
        route = subprocess.run(["ip", "-n", ns, "route", "get", "203.0.113.1"], capture_output=True, text=True)
        assert "dev sink" in route.stdout, (ns, route.stdout)


@pytest.mark.timeout(60)
def test_popen_pid_is_the_programs_own(lab):
    """`ip netns exec` execs: the pid a caller tracks (netproc.Network, by pid) is the program's own."""
    a = lab.host("a")
    proc = a.popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid
    kw = a.netproc(["-c", "pass"])
    assert subprocess.run([kw["exe"], *kw["args"]], timeout=30).returncode == 0


@pytest.mark.timeout(60)
def test_teardown_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            a = lab.host("a", Shape(delay_ms=5))
            sleeper = a.popen(["sleep", "60"])
            deadline = time.monotonic() + 10
            while len(pids := ns_pids(a.ns) + ns_pids(lab.inet)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)  # until the sleeper has entered the namespace (`ip netns exec` does that)
            assert len(pids) == 3 and sleeper.pid in pids  # the sleeper and both delayers
            raise RuntimeError("boom")
    assert not any(alive(p) for p in pids)


# A lab in a child process: prints its id and the pids inside it, then waits to be signalled.
CHILD = f"""
import json, sys, time
sys.path.insert(0, {str(TESTS)!r})
from lab import Lab, Shape, ns_pids
with Lab() as lab:
    a = lab.host("a", Shape(delay_ms=5))
    lab.home_host("home1")
    a.popen(["sleep", "60"])
    while len(pids := ns_pids(a.ns) + ns_pids(lab.inet)) < 3:  # until the sleeper has entered the namespace
        time.sleep(0.05)
    print(json.dumps({{"id": lab.id, "pids": pids}}), flush=True)
    time.sleep(60)
"""


def start_child() -> tuple[subprocess.Popen[str], dict]:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        assert len(mine(child.pid)) == 4 and len(info["pids"]) == 3
    except BaseException:
        child.terminate()  # it tears its lab down
        child.wait(30)
        raise
    return child, info


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_teardown_after_a_signal(sig):
    child, info = start_child()
    child.send_signal(sig)
    assert child.wait(30) != 0
    assert mine(child.pid) == []
    assert not any(alive(p) for p in info["pids"])


@pytest.mark.timeout(60)
def test_cleanup_stale_removes_a_killed_runs_lab_and_spares_live_ones():
    with Lab() as live:  # (a new Lab runs cleanup_stale itself: make this one before the child dies)
        live.host("a")
        child, info = start_child()
        child.kill()  # no teardown at all
        child.wait(10)
        left = mine(child.pid)
        assert len(left) == 4 and any(alive(p) for p in info["pids"])  # the sleeper outlives its owner
        assert sorted(Lab.cleanup_stale()) == sorted(left)
        assert len(mine()) == 2  # this live lab's two namespaces are untouched
    assert mine(child.pid) == []
    deadline = time.monotonic() + 10
    while any(alive(p) for p in info["pids"]) and time.monotonic() < deadline:
        time.sleep(0.1)  # killed; the orphans are reaped by init
    assert not any(alive(p) for p in info["pids"])
