"""Access control for closed runs: an allowlist of peer ids.

A libp2p peer id is the hash of the peer's public key, and every p2p connection proves it, so the member ids that
matchmaking gathers cannot be forged. The coordinator publishes the list in its signed run record and leaves any
other member out of every round (reason `unauthorized`); every peer checks the list too: it refuses to join a run
that does not list it (one clear line), and refuses a commit that merges an unlisted member. Open runs, without a
list, stay the default.
"""
from __future__ import annotations

import os
from typing import Iterable

from hivemind.p2p import PeerID

from lte.errors import ConfigError


def load_allowlist(path: str | os.PathLike[str]) -> frozenset[str]:
    """Peer ids from a file, one per line (`#` starts a comment); ConfigError for anything else."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--allow-peers {path}: cannot read it ({err.__class__.__name__})") from None
    ids = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            PeerID.from_base58(text)
        except Exception:
            raise ConfigError(f"--allow-peers {path}, line {no}: {text[:60]!r} is not a peer id") from None
        ids.append(text)
    if not ids:
        raise ConfigError(f"--allow-peers {path}: lists no peer id")
    return frozenset(ids)


def unlisted(peer_ids: Iterable[str], allow: Iterable[str] | None) -> list[str]:
    """The ids not on the list (none when the run is open)."""
    if allow is None:
        return []
    allowed = set(allow)
    return sorted(p for p in peer_ids if p not in allowed)
