"""`lte-peer` on a machine FACTOR times slower: `python tests/slowpeer.py FACTOR join --dht ...`.

Each optimizer step is followed by a sleep of (FACTOR - 1) x its own time, so the peer is slow without taking the
cores the other processes of a test need (a busy loop would slow them too)."""
from __future__ import annotations

import sys
import time

import lte.train
import peer.cli


def slowed(step, factor: float):
    def slow_step(*args, **kwargs):
        t0 = time.perf_counter()
        loss = step(*args, **kwargs)
        time.sleep((factor - 1.0) * (time.perf_counter() - t0))
        return loss
    return slow_step


if __name__ == "__main__":
    lte.train.optimizer_step = slowed(lte.train.optimizer_step, float(sys.argv[1]))
    sys.exit(peer.cli.main(sys.argv[2:]))
