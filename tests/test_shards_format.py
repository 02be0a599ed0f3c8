"""The shard format and the signed data manifest (lte/shards.py), without a network."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from lte.shards import (DataError, Sample, ShardDataset, build_manifest, pack_shards, parse_manifest,
                        preprocessing_of, sign_manifest)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format="PNG")
    return buf.getvalue()


SAMPLES = [Sample(_png(10 * i), "png", i % 3) for i in range(20)]


def test_packing_is_deterministic_and_plain_tar(tmp_path):
    a = pack_shards(iter(SAMPLES), tmp_path / "a", shard_bytes=8 * 1024)
    b = pack_shards(iter(SAMPLES), tmp_path / "b", shard_bytes=8 * 1024)
    assert len(a) > 1 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with tarfile.open(a[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000.png", "000000.cls"]
        assert tar.extractfile("000000.png").read() == SAMPLES[0].data
    ds = ShardDataset(a[0], preprocessing_of(8))
    x, y = ds[1]
    assert tuple(x.shape) == (3, 8, 8) and y == 1
    assert sum(len(ShardDataset(p, preprocessing_of(None))) for p in a) == len(SAMPLES)
    assert not list((tmp_path / "a").glob(".*"))  # no temporary file left


def _keys():
    from hivemind.utils.crypto import RSAPrivateKey

    from lte.net.records import owner_tag

    key, other = RSAPrivateKey(), RSAPrivateKey()
    return key, owner_tag(key), other, owner_tag(other)


def test_manifest_verifies_only_for_its_coordinator_run_and_contents():
    key, owner, other, other_owner = _keys()
    doc = build_manifest("r", "h" * 64, ["a", "b"], preprocessing_of(32), "src",
                         [{"index": 0, "name": "shard-000000.tar", "sha256": "0" * 64, "blob": "1" * 64,
                           "samples": 5, "bytes": 100}])
    data = sign_manifest(doc, key, owner)
    m = parse_manifest(data, owner, "r", "h" * 64)
    assert m.samples == 5 and m.classes == ("a", "b") and m.shards[0].sha256 == "0" * 64
    with pytest.raises(DataError, match="not signed by the run's coordinator"):
        parse_manifest(sign_manifest(doc, other, other_owner), owner, "r", "h" * 64)
    tampered = json.loads(data)
    tampered["shards"][0]["sha256"] = "f" * 64
    with pytest.raises(DataError, match="signature does not verify"):
        parse_manifest(json.dumps(tampered).encode(), owner, "r", "h" * 64)
    with pytest.raises(DataError, match="not this run"):
        parse_manifest(data, owner, "r", "x" * 64)
    with pytest.raises(DataError, match="not valid JSON"):
        parse_manifest(b"{", owner, "r", "h" * 64)


def test_unreadable_shard_is_a_data_error(tmp_path):
    bad = Path(tmp_path / "x.tar")
    bad.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataError):
        ShardDataset(bad, preprocessing_of(None))
