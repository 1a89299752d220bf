"""Properties of chain resolution (newest wins) and of the manifest's binary extent maps."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from fleece.repository.chain import resolve
from fleece.repository.manifest import DiskRecord, Manifest, decode_extents, encode_extents

SIZE = 256


def blob_for(layer: int, off: int) -> bytes:
    return hashlib.sha256(f"{layer}:{off}".encode()).digest()


@st.composite
def layer(draw: st.DrawFn, index: int) -> list:
    """Non-overlapping entries; some ZERO, the rest a blob unique to (layer, offset)."""
    cuts = sorted(set(draw(st.lists(st.integers(0, SIZE), max_size=10))))
    out = []
    for a, b in zip(cuts, cuts[1:]):
        kind = draw(st.sampled_from(["skip", "zero", "data"]))
        if kind != "skip":
            out.append((a, b - a, None if kind == "zero" else blob_for(index, a)))
    return out


@st.composite
def chains(draw: st.DrawFn) -> list[list]:
    n = draw(st.integers(1, 5))
    return [draw(layer(i)) for i in range(n)]  # index 0 = the full (oldest)


def model(layers_oldest_first: list[list]) -> list:
    """Byte-by-byte: each byte is (blob, offset-in-blob) or None."""
    disk: list = [None] * SIZE
    for entries in layers_oldest_first:
        for off, length, blob in entries:
            for i in range(length):
                disk[off + i] = None if blob is None else (blob, i)
    return disk


@settings(max_examples=300)
@given(chains())
def test_resolve_matches_byte_model(layers: list[list]) -> None:
    pieces = resolve(list(reversed(layers)))
    got: list = [None] * SIZE
    last_end = 0
    for p in pieces:
        assert p.offset >= last_end, "pieces overlap or are unsorted"
        last_end = p.offset + p.length
        for i in range(p.length):
            got[p.offset + i] = None if p.blob is None else (p.blob, p.skip + i)
    assert got == model(layers)


@given(st.lists(st.tuples(st.integers(0, 1 << 50), st.integers(1, 1 << 40),
                          st.one_of(st.none(), st.binary(min_size=32, max_size=32))), max_size=50))
def test_extent_map_roundtrip(entries: list) -> None:
    assert decode_extents(encode_extents(entries), "test") == (entries, {}, set())


def test_manifest_roundtrip_and_size() -> None:
    # a 2 TiB disk's full with 100k distinct 4 MiB blobs stays a few MB
    entries = [(i * (4 << 20), 4 << 20, hashlib.sha256(i.to_bytes(8, "little")).digest()) for i in range(100_000)]
    m = Manifest("20261126T000000.000Z-00000000", "vm", "now", None, "full",
                 {"vda": DiskRecord("full", 2 << 40, entries, qcow2={"cluster_size": 65536})})
    data = m.to_bytes()
    assert len(data) < 6 << 20
    back = Manifest.from_bytes(data, "test")
    assert back.disks["vda"].extents == entries and back.disks["vda"].qcow2 == {"cluster_size": 65536}
