"""Measure the network lab's shaped links (tests/lab.py): what a host on a given link shape actually gets.

Host A's link is shaped (the same shape up and down); host B is unshaped, so the A-B round trip is 2 x delay.
For each shape: ping RTT (min, median, sd over 40 echoes) and TCP bulk goodput each way (`Lab.measure`). The
last row is a home host behind the NAT router (A opens every connection, so that works).
Needs root (network namespaces), like the lab.

    sudo python benchmarks/lab_links.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import Lab, Shape  # noqa: E402

SHAPES = [
    Shape(delay_ms=25, rate_mbit=100),
    Shape(delay_ms=25, rate_mbit=20),
    Shape(delay_ms=25, rate_mbit=5),
    Shape(delay_ms=25, jitter_ms=5, rate_mbit=20),
    Shape(delay_ms=25, loss=0.01, rate_mbit=20),
    Shape(delay_ms=25, jitter_ms=5, loss=0.01, rate_mbit=20),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each bulk transfer")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Linux {platform.release()}")
    print()
    print("| A's link (each way) | RTT set | RTT min | RTT median | RTT sd | echoes lost "
          "| A->B Mbit/s | B->A Mbit/s |")
    print("|---|---|---|---|---|---|---|---|")
    with Lab() as lab:
        a = lab.host("a")
        b = lab.host("b")
        home = lab.home_host("home")
        for host, shape in [(a, s) for s in SHAPES] + [(home, Shape(delay_ms=25, rate_mbit=20))]:
            host.set_link(shape)
            m = lab.measure(host, b, seconds=args.seconds, pings=40)
            link = f"{shape.delay_ms:g} ms" + (f" ± {shape.jitter_ms:g} ms" if shape.jitter_ms else "") + \
                (f", {shape.loss:.0%} loss" if shape.loss else "") + f", {shape.rate_mbit:g} Mbit/s" + \
                (" (behind NAT)" if host is home else "")
            print(f"| {link} | {2 * shape.delay_ms:g} ms | {m.rtt_min_ms:.1f} | {m.rtt_median_ms:.1f} "
                  f"| {m.rtt_mdev_ms:.1f} | {m.ping_loss:.0%} | {m.a_to_b_mbit:.1f} | {m.b_to_a_mbit:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
