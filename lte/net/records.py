"""Small records in the DHT: signed coordinator records, per-round base hashes, and plain expiring records.

Security model: a record under a subkey that contains an owner tag `[owner:<RSA public key>]` can only be
written with that key's signature, but only by nodes that *run* `RSASignatureValidator` (a node without it
stores and returns forgeries). So every node of a run starts its DHT with `default_validators()`, and a
reader selects the owner's exact subkey: a value under any other subkey, however well signed, is ignored.
The owner tag goes in the subkey, not the key, because hivemind hashes keys before validating them.

Base-hash and plain records are not signed: they detect divergence among honest peers, they do not prove
who wrote them.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration

from lte.net.errors import NetworkError

# DHT values above ~1 MiB crash hivemind's DHT process (pipe error); stay far below.
MAX_RECORD_BYTES = 64 * 1024
PUBLISH_ATTEMPTS = 3  # publish_signed: tries before a refusal counts

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- validators and keys ------------------------------------------------------------------------------


def default_validators(private_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """The validators every node of a run must run; `private_key` is the key this node signs with.

    Without a key, hivemind's process-wide key is used (fine for peers, which sign nothing that matters).
    A SchemaValidator is not included: it needs pydantic.v1 models and adds little over reader-side checks.
    """
    return [RSASignatureValidator(private_key)]


def owner_tag(private_key: RSAPrivateKey) -> bytes:
    """The `[owner:...]` subkey under which only `private_key` can write."""
    return RSASignatureValidator(private_key).local_public_key


def fingerprint(owner: bytes) -> str:
    """A short, printable id of an owner tag (for logs and for pinning the coordinator in a config)."""
    return hashlib.sha256(owner).hexdigest()[:16]


def load_or_create_private_key(path: str | os.PathLike[str]) -> RSAPrivateKey:
    """Load the RSA key at `path`, or create one and save it there, so a restarted coordinator keeps its identity.

    The file holds the key in DER form (what hivemind itself pickles), not a pickle: loading a key file should
    never be able to run code. It is written atomically with mode 0600.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        with open(path, "rb") as f:
            der = f.read()
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        try:
            key.__setstate__({"_private_key": der})  # hivemind's own unpickling path for this class
        except ValueError as e:
            raise NetworkError(f"cannot read RSA key from {path}: {e}") from e
        return key
    key = RSAPrivateKey()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".key-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_bytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return key


# --- generic records --------------------------------------------------------------------------------------


def _check_size(value: Any) -> None:
    size = len(MSGPackSerializer.dumps(value))
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"DHT record of {size} bytes exceeds {MAX_RECORD_BYTES} (large values crash the DHT)")


def publish(dht: hivemind.DHT, key: str, value: Any, ttl: float, subkey: Any = None, *, wait: bool = True) -> bool:
    """Store a small msgpack-serializable `value` under `key` (and `subkey`) for `ttl` seconds.

    Returns hivemind's verdict: False when no node accepted it (e.g. a newer value exists, or validation failed).
    With `wait=False` the store goes on in the DHT process and this returns True at once: for announcements
    nothing waits on (base hashes, liveness), because a store asks the nodes nearest the key and each one that
    does not answer costs hivemind's request timeout, seconds in which a peer would train nothing.
    """
    _check_size(value)
    if not wait:
        future = dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)
        future.add_done_callback(_ignore_result)
        return True
    return bool(dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey))


def _ignore_result(future: Any) -> None:
    with suppress(BaseException):  # read it, so that a failed background store is not reported as unretrieved
        future.exception()


def read(dht: hivemind.DHT, key: str) -> Any:
    """The latest value under `key`: the value itself, a {subkey: value} dict for subkeyed records, or None."""
    found = dht.get(key, latest=True)
    if found is None:
        return None
    if _is_subkeyed(found.value):
        return {subkey: item.value for subkey, item in found.value.items()}
    return found.value


def _is_subkeyed(value: Any) -> bool:
    # hivemind returns subkeyed records as {subkey: ValueWithExpiration}; a plain dict value has no wrappers.
    return isinstance(value, dict) and all(isinstance(item, ValueWithExpiration) for item in value.values())


# --- signed records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRecord:
    """A record that only the holder of `owner`'s private key could have written."""

    value: Any
    owner: bytes
    expiration_time: float


def publish_signed(dht: hivemind.DHT, key: str, value: Any, owner: bytes, ttl: float) -> None:
    """Publish `value` under `key` in `owner`'s subkey; `dht` must have been started with the owner's key.

    Republish before `ttl` runs out to keep the record alive. Raises NetworkError when the DHT refuses the
    record, which is what happens when `dht` signs with a different key than `owner`'s.

    hivemind's verdict is the answer of whichever replica answered last, so one replica that refuses its copy (one
    it already holds is refused as not newer, e.g. when a peer restarted with its identity is reached under its old
    and its new node id) fails a store that the others took. So a refusal is checked by reading the record back,
    and the store is tried again before it counts. Seen in `tests/test_faults.py` around a stalled peer: without
    the check the coordinator ended its run over a record that was stored.
    """
    for attempt in range(PUBLISH_ATTEMPTS):
        if attempt:
            time.sleep(0.5 * attempt)
        if publish(dht, key, value, ttl, subkey=owner):
            return
        stored = read_signed(dht, key, owner)
        if stored is not None and stored.value == value:
            return
    raise NetworkError(f"DHT refused signed record {key!r} (is the DHT running with owner {fingerprint(owner)}?)")


def read_signed(dht: hivemind.DHT, key: str, owner: bytes) -> SignedRecord | None:
    """`owner`'s record under `key`, or None; values under any other subkey are ignored."""
    found = dht.get(key, latest=True)
    if found is None or not _is_subkeyed(found.value) or owner not in found.value:
        return None
    item = found.value[owner]
    return SignedRecord(item.value, owner, item.expiration_time)


def read_signed_all(dht: hivemind.DHT, key: str) -> dict[bytes, SignedRecord]:
    """Every owner-tagged record under `key`, by owner tag.

    Each is validly signed by its own owner, which proves nothing about who that owner is: use it to
    discover or display candidates (with `fingerprint`), and `read_signed` to trust one.
    """
    found = dht.get(key, latest=True)
    if found is None or not _is_subkeyed(found.value):
        return {}
    owned = {}
    for subkey, item in found.value.items():
        if isinstance(subkey, bytes) and RSASignatureValidator._PUBLIC_KEY_RE.fullmatch(subkey):
            owned[subkey] = SignedRecord(item.value, subkey, item.expiration_time)
    return owned


# --- per-round base hashes ----------------------------------------------------------------------------


def hash_key(run: str, round_id: int) -> str:
    """DHT key of the base hashes published after round `round_id` of `run`."""
    return f"{run}.hash.{round_id}"


def publish_base_hash(
    dht: hivemind.DHT, run: str, round_id: int, peer_id: str, sha256_hex: str, ttl: float = 600.0,
    *, wait: bool = True,
) -> bool:
    """Announce the hash of this participant's base weights after round `round_id` (`wait`: see `publish`)."""
    if not _HEX_SHA256.fullmatch(sha256_hex):
        raise ValueError(f"not a lowercase hex sha256: {sha256_hex!r}")
    return publish(dht, hash_key(run, round_id), sha256_hex, ttl, subkey=str(peer_id), wait=wait)


def read_base_hashes(dht: hivemind.DHT, run: str, round_id: int) -> dict[str, str]:
    """{peer_id: sha256 hex} published for round `round_id`; malformed entries are dropped."""
    entries = read(dht, hash_key(run, round_id))
    if not isinstance(entries, Mapping):
        return {}
    return {
        subkey: value
        for subkey, value in entries.items()
        if isinstance(subkey, str) and isinstance(value, str) and _HEX_SHA256.fullmatch(value)
    }


def disagreeing_peers(hashes: Mapping[str, str], expected: str) -> Sequence[str]:
    """Peers whose published hash differs from `expected` (sorted, for stable logs)."""
    return sorted(peer for peer, sha in hashes.items() if sha != expected)


# --- binding the coordinator's peer id to its owner tag -------------------------------------------------------
_BINDING_CONTEXT = b"lte-owner-binding-v1|"


def _peer_id_of_rsa_der(public_der: bytes) -> str:
    """The libp2p peer id of an RSA public key (DER SubjectPublicKeyInfo), as `PeerID.from_identity` computes it."""
    import multihash
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def bind_owner(identity_path: str | os.PathLike[str], owner: bytes) -> dict[str, bytes]:
    """Proof, signed with the libp2p identity key behind a node's peer id, that `owner` is that node's record key.

    Anyone can store a well-signed record under a run's key with their own key; with this proof in the run record,
    a reader that knows only the coordinator's peer id (from the --dht address) can tell the coordinator's record
    from the others by itself, even when the coordinator is gone (`owner_bound_to`)."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    der = crypto_pb2.PrivateKey.FromString(open(identity_path, "rb").read()).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    public = key.get_public_key()._public_key.public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"p2p_key": public, "signature": key.sign(_BINDING_CONTEXT + owner)}


def owner_bound_to(peer_id: str, owner: bytes, binding: Any) -> bool:
    """Whether `binding` (from `bind_owner`) proves that the node with `peer_id` holds record key `owner`."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.utils.crypto import RSAPublicKey

    if not isinstance(binding, dict) or not all(isinstance(binding.get(k), bytes) for k in ("p2p_key", "signature")):
        return False
    try:
        if _peer_id_of_rsa_der(binding["p2p_key"]) != peer_id:
            return False
        public = RSAPublicKey(serialization.load_der_public_key(binding["p2p_key"]))
    except Exception:  # not a key at all
        return False
    return public.verify(_BINDING_CONTEXT + owner, binding["signature"])
