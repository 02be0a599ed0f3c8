"""Signed coordinator records, base-hash records and plain records on a real DHT."""
from __future__ import annotations

import os
import stat

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from lte.net import NetworkError
from lte.net import records as rec

SPEC = {"name": "digits", "sha256": "ab" * 32, "rounds": 100}


@pytest.fixture(scope="module")
def keys():
    return {"coordinator": RSAPrivateKey(), "mallory": RSAPrivateKey()}


@pytest.fixture
def nodes(swarm, keys):
    coordinator = swarm.start(validators=rec.default_validators(keys["coordinator"]))
    mallory = swarm.start(validators=rec.default_validators(keys["mallory"]))
    peer = swarm.start(client_mode=True)  # default validators, as every peer runs
    return coordinator, mallory, peer


@pytest.mark.timeout(90)
def test_signed_record_round_trip_and_forgeries_ignored(nodes, keys):
    coordinator, mallory, peer = nodes
    owner, mallory_owner = rec.owner_tag(keys["coordinator"]), rec.owner_tag(keys["mallory"])
    rec.publish_signed(coordinator, "run1.spec", SPEC, owner, ttl=60)

    got = rec.read_signed(peer, "run1.spec", owner)
    assert got is not None and got.value == SPEC and got.owner == owner

    # Mallory cannot write under the coordinator's subkey: her DHT cannot sign for it, validators refuse.
    with pytest.raises(NetworkError, match="refused"):
        rec.publish_signed(mallory, "run1.spec", {"name": "evil"}, owner, ttl=120)
    assert not rec.publish(mallory, "run1.spec", {"name": "evil"}, 120, subkey=owner)
    # ... and what she may write under her own or an unowned subkey is not what readers select.
    rec.publish_signed(mallory, "run1.spec", {"name": "evil"}, mallory_owner, ttl=120)
    assert rec.publish(mallory, "run1.spec", {"name": "evil"}, 120, subkey="coordinator")

    for node in nodes:
        assert rec.read_signed(node, "run1.spec", owner).value == SPEC
    everyone = rec.read_signed_all(peer, "run1.spec")
    assert set(everyone) == {owner, mallory_owner}  # the unowned subkey is not listed
    assert rec.fingerprint(owner) != rec.fingerprint(mallory_owner)
    assert rec.read_signed(peer, "run1.nothing", owner) is None


@pytest.mark.timeout(90)
def test_base_hash_records(nodes):
    coordinator, mallory, peer = nodes
    published = {}
    for i, node in enumerate(nodes):
        sha = f"{i:x}" * 64
        assert rec.publish_base_hash(node, "run1", 7, str(node.peer_id), sha)
        published[str(node.peer_id)] = sha
    assert rec.publish(peer, rec.hash_key("run1", 7), "not-a-hash", 60, subkey="junk")
    assert rec.read_base_hashes(coordinator, "run1", 7) == published
    assert rec.read_base_hashes(peer, "run1", 8) == {}
    assert rec.disagreeing_peers(published, "0" * 64) == sorted(p for p in published if published[p] != "0" * 64)
    with pytest.raises(ValueError):
        rec.publish_base_hash(peer, "run1", 7, str(peer.peer_id), "ABC")


@pytest.mark.timeout(90)
def test_plain_records_and_size_limit(nodes):
    coordinator, _, peer = nodes
    assert rec.publish(peer, "run1.status", {"round": 3, "peers": 2}, ttl=30)
    assert rec.read(coordinator, "run1.status") == {"round": 3, "peers": 2}
    assert rec.publish(peer, "run1.progress", 10, ttl=30, subkey="a")
    assert rec.publish(coordinator, "run1.progress", 20, ttl=30, subkey="b")
    assert rec.read(peer, "run1.progress") == {"a": 10, "b": 20}
    assert rec.read(peer, "run1.missing") is None
    with pytest.raises(ValueError, match="exceeds"):
        rec.publish(peer, "run1.big", b"x" * (rec.MAX_RECORD_BYTES + 1), ttl=30)


@pytest.mark.timeout(30)
def test_private_key_persists(tmp_path):
    path = tmp_path / "keys" / "coordinator.key"
    first = rec.load_or_create_private_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = rec.load_or_create_private_key(path)
    assert rec.owner_tag(again) == rec.owner_tag(first)
    assert again.get_public_key().verify(b"data", first.sign(b"data"))
    path.write_bytes(b"not a key")
    with pytest.raises(NetworkError, match="cannot read RSA key"):
        rec.load_or_create_private_key(path)
