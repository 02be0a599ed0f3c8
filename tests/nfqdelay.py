"""Delay, jitter and loss for one direction of a lab link, in user space through NFQUEUE (the lab's helper).

The kernel of our machines has no `sch_netem`, so `tc` cannot delay or drop packets. The lab (tests/lab.py)
sends the IPv4 packets of one direction of a host's link to an NFQUEUE queue with iptables (down: in the
host's namespace, as they arrive on eth0; up: in the bridge's namespace, as they enter the host's port), and
this process, started in that namespace, holds each packet for its delay and then lets the kernel send it on
(verdict ACCEPT), or drops it (verdict DROP) with probability `loss`.

It speaks the nfnetlink_queue protocol itself over an AF_NETLINK socket (about 60 lines below), so it needs no
compiled library: PyPI's NetfilterQueue is an sdist that needs gcc, Cython and libnetfilter-queue-dev on the
machine, which a fresh CI machine has not; the protocol has been stable since Linux 3.x.

Guarantees, and why:
- Packets of a queue leave in the order they arrived (FIFO): each packet's release time is
  max(arrival + delay + jitter sample, release time of the packet before it). A real path does not reorder a
  flow, and TCP over a reordering link would measure something else. Jitter is a uniform sample in
  [-jitter, +jitter] (netem's default distribution), so the mean delay is slightly above `delay` when
  jitter is large compared with the gap between packets.
- Only metadata is copied to user space (NFQNL_COPY_META): the payload never leaves the kernel.
- Accepts are sent as batch verdicts ("every packet up to id N"), which is exact because release is FIFO and
  packets are numbered in arrival order; a drop is sent at once, for that packet only.
- A drop by verdict is silent for the sender (its send call succeeded long before), like loss on a wire.
- The process exits when its stdin closes, so it never outlives the lab that started it (the lab also kills
  every process left in its namespaces, by pid, before deleting them).

Usage (by the lab): python nfqdelay.py QUEUE [QUEUE ...]; prints "ready" once bound, then reads one JSON object
per line on stdin: {"queue": 0, "delay_ms": 25, "jitter_ms": 5, "loss": 0.01}, and answers "ok" once it applies.
"""
from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import sys
import time
from collections import deque

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP, NF_ACCEPT = 0, 1
QUEUE_MAXLEN = 20000  # packets held per queue: 100 Mbit/s x 1 s of 1500-byte packets is 8300


class Queue:
    """One NFQUEUE queue's settings and the ids of the packets it holds, with their release times."""

    def __init__(self) -> None:
        self.delay = self.jitter = self.loss = 0.0
        self.held: deque[tuple[float, int]] = deque()  # (release time, packet id), release times non-decreasing


class Delayer:
    def __init__(self, queues: list[int]):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): bursts of 100 Mbit/s
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.seq = 0
        self.queues = {q: Queue() for q in queues}
        for q in queues:
            self._config(q, NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, 0))
            self._config(q, NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
            self._config(q, NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN))

    # ----- netlink ------------------------------------------------------------------------------------------
    def _message(self, kind: int, queue: int, attrs: list[tuple[int, bytes]], flags: int = NLM_F_REQUEST) -> bytes:
        body = struct.pack(">BBH", socket.AF_UNSPEC, 0, queue)  # nfgenmsg: family, version, res_id (the queue)
        for atype, payload in attrs:
            body += struct.pack("=HH", 4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)
        self.seq += 1
        return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, self.seq, 0) + body

    def _config(self, queue: int, atype: int, payload: bytes) -> None:
        """Send one config attribute and wait for the kernel's acknowledgement (an error raises)."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, queue, [(atype, payload)], NLM_F_REQUEST | NLM_F_ACK))
        data = self.sock.recv(65536)
        length, mtype = struct.unpack_from("=IH", data)
        if mtype == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, 16)
            if error:
                raise OSError(-error, f"nfqueue config of queue {queue}: {os.strerror(-error)}")

    def _verdict(self, queue: int, packet_id: int, verdict: int, batch: bool) -> None:
        kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
        self.sock.send(self._message(kind, queue, [(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))]))

    def _packets(self, data: bytes) -> list[tuple[int, int]]:
        """(queue, packet id) of each packet message in one netlink datagram."""
        out, off = [], 0
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                (queue,) = struct.unpack_from(">H", data, off + 18)
                a = off + 20
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atype & 0x3FFF == NFQA_PACKET_HDR:
                        out.append((queue, struct.unpack_from(">I", data, a + 4)[0]))
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3
        return out

    # ----- the loop -----------------------------------------------------------------------------------------
    def _arrive(self, queue: int, packet_id: int, now: float) -> None:
        q = self.queues[queue]
        if q.loss and random.random() < q.loss:
            self._verdict(queue, packet_id, NF_DROP, batch=False)
            return
        release = now + max(0.0, q.delay + (random.uniform(-q.jitter, q.jitter) if q.jitter else 0.0))
        if q.held and q.held[-1][0] > release:
            release = q.held[-1][0]  # FIFO: never before the packet ahead of it
        q.held.append((release, packet_id))

    def _release(self, now: float) -> None:
        for number, q in self.queues.items():
            last = None
            while q.held and q.held[0][0] <= now:
                last = q.held.popleft()[1]
            if last is not None:
                self._verdict(number, last, NF_ACCEPT, batch=True)

    def _control(self, line: str) -> None:
        cmd = json.loads(line)
        q = self.queues[int(cmd["queue"])]
        q.delay = float(cmd.get("delay_ms", 0.0)) / 1000
        q.jitter = float(cmd.get("jitter_ms", 0.0)) / 1000
        q.loss = float(cmd.get("loss", 0.0))

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        self.sock.setblocking(False)
        buf = b""
        while True:
            now = time.monotonic()
            due = [q.held[0][0] for q in self.queues.values() if q.held]
            timeout = max(0.0, min(due) - now) if due else None
            readable, _, _ = select.select([self.sock, stdin], [], [], timeout)
            if stdin in readable:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return  # the lab has gone: stop (the kernel drops what we still hold)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._control(line.decode())
                        print("ok", flush=True)  # the lab waits for this: settings apply from now on
            if self.sock in readable:
                now = time.monotonic()
                while True:
                    try:
                        data = self.sock.recv(65536)
                    except BlockingIOError:
                        break
                    for queue, packet_id in self._packets(data):
                        self._arrive(queue, packet_id, now)
            self._release(time.monotonic())


def main() -> None:
    delayer = Delayer([int(q) for q in sys.argv[1:]])
    print("ready", flush=True)
    delayer.run()


if __name__ == "__main__":
    main()
