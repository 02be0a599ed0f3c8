"""Networking transport for lte-network over hivemind. Generic: it knows nothing of LoRA.

peer/ and coordinator/ both import it; `lte` itself never does. Modules, one job each:
- `node`: start/stop a DHT node (bounded, clean failures), visible addresses; re-exports process hygiene.
- `records`: signed coordinator records, per-round base hashes, small expiring records, key persistence.
- `blobs`: content-addressed tensor blobs served, fetched and pushed over hivemind P2P (`blobstore` holds them).
- `membership`: agreement on each round's member set (hivemind averager matchmaking, no averaging).
- `procs`, `aio`, `counters`, `errors`: process hygiene, a background event loop, byte counters, exceptions.
This package only re-exports the error types, so importing it stays cheap.
"""
import os

# hivemind switches torch's tensor sharing to `file_system`, which starts a torch_shm_manager daemon that outlives
# a stopped peer. File descriptors need no daemon; it must be chosen before hivemind is first imported.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from lte.net.errors import (  # noqa: E402
    BlobFetchError,
    BlobIntegrityError,
    BlobNotFound,
    BlobTimeout,
    GroupNotFound,
    NetworkError,
)

__all__ = ["BlobFetchError", "BlobIntegrityError", "BlobNotFound", "BlobTimeout", "GroupNotFound", "NetworkError"]
