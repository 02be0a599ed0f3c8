"""Where a peer keeps the run's data shards, and the check that it can (standard library only: the CLI checks
`--cache-dir` before it imports torch or hivemind, so a bad one is refused at once)."""
from __future__ import annotations

import os
from pathlib import Path

from lte.errors import ConfigError


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lte-network/data (~/.cache/lte-network/data): shards are cached under their sha256, so one
    cache serves every run that lists them."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lte-network" / "data"


def check_cache_dir(path: Path) -> Path:
    """Create `path` if needed and prove it writable by writing a file there; ConfigError (one line) if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--cache-dir {path}: not a writable directory ({err.strerror or err})") from None
    return path
