"""argparse pieces the command-line tools share, so that a bad flag fails like a bad config: one line, exit 2.

Only the standard library here: the tools parse and check their arguments before they import torch or hivemind,
so a typo is answered at once, and before any process, file or directory is created.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import socket
from pathlib import Path
from typing import Callable, NoReturn

from lte.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its whole usage block before the error; a tool prints only `prog: error: reason`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    bounds = f"at least {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {bounds})")
        return value

    return parse


tcp_port = int_in(0, 65535)  # 0: any free port


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (`nan`, `inf` and 0 would never end or never wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a positive, finite number (a size, a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def ip_address(text: str) -> str:
    """An argparse type: an IPv4 or IPv6 address to listen on (libp2p listens on addresses, not host names)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def directory_to_create(path: Path, flag: str) -> Path:
    """`path` for a flag that names a directory the tool creates if missing: refused if a file is in the way."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is not a directory")
    return path


def existing_path(path: str | Path, flag: str) -> Path:
    """`path` for a flag that names input which must already be there."""
    if not Path(path).exists():
        raise ConfigError(f"{flag} {path} does not exist")
    return Path(path)


def file_in_existing_directory(path: str | Path, flag: str) -> Path:
    """`path` for a flag that names a file read if present and created if not: its directory must exist."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {path} is not a file")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {path.parent} does not exist")
    return path


def port_free(host: str, port: int | None, flag: str) -> None:
    """Refuse a busy `port` before anything starts (the DHT behind --port comes up only after the model is built,
    and a failed start would leave files behind). 0 or None: any free port, nothing to check."""
    if not port:
        return
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port}: {err.strerror or err}") from None


def device_available(device: str) -> None:
    """Refuse `--device cuda` on a machine without CUDA before anything starts (torch would fail mid-run)."""
    if device == "cuda":
        import torch  # here, not at the top: the other checks must stay instant

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
