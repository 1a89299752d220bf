"""Repository format 2 (encrypted) without QEMU: sealed packs, sealed index objects, and a repository
on the local backend — unlocking, write-only keys, key slots, config authentication, privacy of names,
rebuild-index and verify. Short and exact: every check here is about one promise of docs/FORMAT.md."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from fleece.repository import DiskRecord, IntegrityError, Manifest, RepoConfig, Repository, UsageError, new_point_id
from fleece.repository.check import verify
from fleece.repository.codec import Codec, Encoded
from fleece.repository.credentials import Credential
from fleece.repository.crypto import PACK_HEADER_SIZE, WRITE_ONLY, MasterKey
from fleece.repository.errors import FormatMismatch, KeyAccessError, WrongKeyError
from fleece.repository.index import MAGIC, MAGIC2, decode_index, encode_index
from fleece.repository.pack import PackBuilder, PackEntry, PlainPacks, SealedPacks, pack_id_of, pack_name

BLOB = 256 << 10  # small blobs: these tests are about layout, not throughput
PW = Credential("passphrase", b"format two password", "test")


def chunks() -> list[bytes]:
    """Compressible text, random bytes and a short tail: blobs stored zstd, raw, and short."""
    text = (b"fleece format two: every payload sealed under its pack's own key. " * 4096)[:BLOB]
    return [text, os.urandom(BLOB), os.urandom(1234)]


# -- packs ----------------------------------------------------------------------------------------------

def build(layout: PlainPacks | SealedPacks, codec: Codec, data: list[bytes]) -> tuple[str, bytes, list[PackEntry],
                                                                                       bytes, int]:
    """One finished pack of *data*: (pack id, its bytes, its entries, its header, where the trailer starts)."""
    builder = PackBuilder(4 << 20, layout)
    for blob in data:
        builder.add(codec.encode(blob))
    payload_end = builder.size
    pack_id, view, entries = builder.finish()
    return pack_id, bytes(view), list(entries), builder.header, payload_end


@pytest.fixture(scope="module")
def master() -> MasterKey:
    return MasterKey.generate()


def test_sealed_pack_round_trip(master: MasterKey) -> None:
    layout, codec = SealedPacks(master), Codec(3, master.blob_id)
    data = chunks()
    pack_id, raw, entries, header, end = build(layout, codec, data)
    assert len(header) == PACK_HEADER_SIZE
    assert pack_id == hashlib.sha256(raw[end:]).hexdigest()  # the id is the SHA-256 of the trailer
    assert raw[end:end + PACK_HEADER_SIZE] == header and raw.endswith(b"FLCPACK2")
    assert len(raw) == layout.size(entries)
    got, got_header = layout.verify(pack_id, raw, len(raw), "p")
    assert got == entries and got_header == header
    assert [e.id for e in entries] == [master.blob_id(d) for d in data]  # keyed ids, not SHA-256
    assert all(e.length == len(codec.encode(d).payload) + layout.overhead for e, d in zip(entries, data))
    for e, plain in zip(entries, data):
        opened = layout.open(header, e.id, raw[e.offset:e.offset + e.length], "p")
        assert codec.decode(opened, e.raw_length, e.encoding, e.id, "p") == plain
    # nothing in the pack is readable: neither a payload (the random blob is stored raw) nor a blob id
    assert data[1][1000:1064] not in raw
    assert all(e.id not in raw for e in entries)
    # the verify reads only the tail it is given, as pack_trailer does
    tail = raw[-layout.span(len(entries)):]
    assert layout.verify(pack_id, tail, len(raw), "p") == (entries, header)


@pytest.mark.parametrize("where", ["sealed table", "header", "footer count", "footer magic"])
@pytest.mark.parametrize("rename", [False, True])
def test_a_flipped_trailer_byte_is_refused(master: MasterKey, where: str, rename: bool) -> None:
    """A flipped byte anywhere in the trailer fails, both under the old name and (a forger's try) under the
    name recomputed from the damaged trailer: the seal, not only the name, catches it."""
    layout = SealedPacks(master)
    pack_id, raw, entries, _, end = build(layout, Codec(3, master.blob_id), chunks())
    spot = {"sealed table": end + PACK_HEADER_SIZE + 30, "header": end + 5, "footer count": len(raw) - 12,
            "footer magic": len(raw) - 1}[where]
    damaged = bytearray(raw)
    damaged[spot] ^= 0x01
    name = pack_id_of(bytes(damaged[end:])) if rename else pack_id
    with pytest.raises(IntegrityError, match="pack p"):
        layout.verify(name, bytes(damaged), len(damaged), "p")


def test_payloads_are_bound_to_blob_id_and_pack(master: MasterKey) -> None:
    layout, codec = SealedPacks(master), Codec(3, master.blob_id)
    _, raw_a, entries_a, header_a, end_a = build(layout, codec, chunks())
    _, raw_b, entries_b, header_b, _ = build(layout, codec, chunks())
    e0, e1 = entries_a[0], entries_a[1]
    payload = raw_a[e0.offset:e0.offset + e0.length]
    assert layout.open(header_a, e0.id, payload, "a")  # as written
    with pytest.raises(IntegrityError, match=f"blob {e1.id.hex()} in pack a .*authentication"):
        layout.open(header_a, e1.id, payload, "a")  # the entry of another blob pointed at this payload
    with pytest.raises(IntegrityError, match="authentication"):
        layout.open(header_b, e0.id, payload, "b")  # the payload moved to another pack
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0x80
    with pytest.raises(IntegrityError, match="authentication"):
        layout.open(header_a, e0.id, bytes(flipped), "a")
    # pack b's trailer grafted onto pack a's payloads: the trailer verifies, no payload opens
    grafted = raw_a[:end_a] + raw_b[len(raw_b) - layout.span(len(entries_b)):]
    assert len(grafted) == len(raw_b)  # same blob sizes (the text blob compresses alike): offsets line up
    got, header = layout.verify(pack_id_of(grafted[end_a:]), grafted, len(grafted), "g")
    assert header == header_b
    for e in got:
        with pytest.raises(IntegrityError, match="authentication"):
            layout.open(header, e.id, grafted[e.offset:e.offset + e.length], "g")
    # a table sealed with another repository's meta key does not open here
    with pytest.raises(IntegrityError, match="blob table of pack a.*authentication"):
        SealedPacks(MasterKey.generate()).verify(pack_id_of(raw_a[end_a:]), raw_a, len(raw_a), "a")


def test_write_only_packs_open_only_with_the_full_key(master: MasterKey) -> None:
    view = master.write_only()
    layout, codec = SealedPacks(view), Codec(3, view.blob_id)
    data = chunks()
    pack_id, raw, entries, header, _ = build(layout, codec, data)
    assert layout.verify(pack_id, raw, len(raw), "p") == (entries, header)  # the table: metadata, readable
    e = entries[0]
    with pytest.raises(KeyAccessError, match="write-only"):
        layout.open(header, e.id, raw[e.offset:e.offset + e.length], "p")
    opened = SealedPacks(master).open(header, e.id, raw[e.offset:e.offset + e.length], "p")
    assert codec.decode(opened, e.raw_length, e.encoding, e.id, "p") == data[0]


def test_plain_packs_are_format_1_byte_for_byte() -> None:
    """Format 1 packs are exactly what docs/FORMAT.md says, computed here independently of pack.py."""
    codec = Codec(3)
    data = chunks()
    encoded: list[Encoded] = [codec.encode(d) for d in data]
    pack_id, raw, entries, header, end = build(PlainPacks(), codec, data)
    assert header == b""
    assert raw[:end] == b"".join(bytes(e.payload) for e in encoded)  # payloads back to back, as they are
    table, offset = b"", 0
    for d, e in zip(data, encoded):
        table += struct.pack("<32sQIIB3x", hashlib.sha256(d).digest(), offset, len(e.payload), len(d), e.encoding)
        offset += len(e.payload)
    assert raw[end:] == table + struct.pack("<I", len(data)) + hashlib.sha256(table).digest() + b"FLCPACK1"
    assert pack_id == hashlib.sha256(table + raw[-44:]).hexdigest()
    assert PlainPacks().verify(pack_id, raw, len(raw), "p") == (entries, b"")
    # the default builder layout is format 1
    builder = PackBuilder(1 << 20)
    builder.add(encoded[2])
    assert builder.finish()[0] == hashlib.sha256(bytes(builder.finish()[1])[len(encoded[2].payload):]).hexdigest()
    assert builder.header == b""


# -- index objects --------------------------------------------------------------------------------------

def records(master: MasterKey) -> list[tuple[str, list[PackEntry], bytes]]:
    layout, codec = SealedPacks(master), Codec(3, master.blob_id)
    out = []
    for _ in range(2):
        pack_id, _, entries, header, _ = build(layout, codec, chunks())
        out.append((pack_id, entries, header))
    return out


def test_index_format_2_round_trip(master: MasterKey) -> None:
    packs = records(master)
    index_id, data = encode_index(packs, master.meta)
    assert index_id == hashlib.sha256(data).hexdigest() and data.startswith(MAGIC2)
    assert decode_index(index_id, data, master.meta) == packs  # headers included
    assert all(bytes.fromhex(pack_id) not in data and entries[0].id not in data and header not in data
               for pack_id, entries, header in packs)
    # format 1 still round-trips without headers
    plain = [(p, e, b"") for p, e, _ in packs]
    index_id1, data1 = encode_index([(p, e) for p, e, _ in packs])
    assert data1.startswith(MAGIC) and decode_index(index_id1, data1) == plain


def test_index_of_the_other_format_or_key_is_refused(master: MasterKey) -> None:
    packs = records(master)
    id2, data2 = encode_index(packs, master.meta)
    id1, data1 = encode_index([(p, e) for p, e, _ in packs])
    with pytest.raises(FormatMismatch, match=r"is a plaintext \(format 1\) index but the config says .*encrypted"):
        decode_index(id1, data1, master.meta)  # a format 1 index planted in a format 2 repository
    with pytest.raises(FormatMismatch, match=r"is an encrypted \(format 2\) index but the config says .*unencrypted"):
        decode_index(id2, data2)  # and the other way round
    with pytest.raises(IntegrityError, match=f"index/{id2} fails authentication"):
        decode_index(id2, data2, MasterKey.generate().meta)


@pytest.mark.parametrize("spot", [8, 20, -1])  # nonce, ciphertext, tag
def test_tampered_index_is_refused(master: MasterKey, spot: int) -> None:
    index_id, data = encode_index(records(master), master.meta)
    damaged = bytearray(data)
    damaged[spot] ^= 0x01
    with pytest.raises(IntegrityError, match="does not match its name"):
        decode_index(index_id, bytes(damaged), master.meta)
    renamed = hashlib.sha256(damaged).hexdigest()  # a forger recomputes the name: the seal still refuses
    with pytest.raises(IntegrityError, match="fails authentication"):
        decode_index(renamed, bytes(damaged), master.meta)


# -- a repository ---------------------------------------------------------------------------------------

def create(path: Path, credential: Credential = PW, **config: int) -> Repository:
    return Repository.open(str(path), create=True, config=RepoConfig.encrypted(**config), credential=credential,
                           kdf_time=0)


def reopen(path: Path, credential: object = PW) -> Repository:
    return Repository.open(str(path), credential=credential)  # type: ignore[arg-type]


def write_point(repo: Repository, data: list[bytes], vm: str = "db01") -> Manifest:
    extents = []
    lock = threading.Lock()
    with repo.writer() as w:
        for i, blob in enumerate(data):
            def done(ident: bytes, stored: int, off: int = i * BLOB, n: int = len(blob)) -> None:
                with lock:
                    extents.append((off, n, ident))
            w.add(blob, done)
        stats = w.flush()
    m = Manifest(new_point_id(), vm, "2026-12-01T00:00:00Z", None, "full",
                 {"d0": DiskRecord("full", len(data) * BLOB, sorted(extents), stats=stats.as_dict())})
    repo.commit(m)
    return m


def read_disk(repo: Repository, m: Manifest) -> list[bytes]:
    return [repo.read_blob(blob) for _, _, blob in m.disks["d0"].extents]


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def test_create_write_reopen(repo_path: Path) -> None:
    repo = create(repo_path)
    assert repo.encrypted and repo.created and repo.keys is not None and repo.keys.can_read
    assert repo.config.format == 2 and repo.config.auth and repo.slot is not None
    assert [s.id for s in repo.key_slots()] == [repo.slot.id]
    data = chunks()
    m = write_point(repo, data)
    again = reopen(repo_path)
    assert not again.created and again.slot is not None and again.slot.id == repo.slot.id
    got = again.find_point("db01", "latest")
    assert got.id == m.id and read_disk(again, got) == data
    ids = [e[2] for e in got.disks["d0"].extents]
    assert dict(again.iter_blobs(ids)) == dict(zip(ids, data))  # in pack order, not asked order
    # every pack is a format 2 pack, and the index knows each one's header
    for info in again.backend.list("data/"):
        assert again.backend.get(info.name)[-8:] == b"FLCPACK2"
    for _, _, blob in got.disks["d0"].extents:
        loc = again.locate(blob)
        assert len(loc.header) == PACK_HEADER_SIZE and again.pack_trailer(loc.pack)[1] == loc.header


def test_wrong_or_missing_credential_fails_before_any_work(repo_path: Path) -> None:
    create(repo_path)
    with pytest.raises(WrongKeyError, match="wrong password") as info:
        reopen(repo_path, Credential("passphrase", b"not the password", "test"))
    assert not isinstance(info.value, KeyAccessError)
    asked: list[bool] = []

    def nobody(new: bool) -> None:
        asked.append(new)
        return None

    with pytest.raises(WrongKeyError, match="is encrypted: set FLEECE_PASSWORD"):
        reopen(repo_path, nobody)
    assert asked == [False]  # asked once, for an existing repository
    with pytest.raises(WrongKeyError, match="no key file key slot"):
        reopen(repo_path, Credential("keyfile", os.urandom(32), "test"))
    with pytest.raises(UsageError, match="is encrypted: set FLEECE_PASSWORD"):
        create(repo_path.parent / "other", nobody)  # type: ignore[arg-type]
    assert asked == [False, True] and not (repo_path.parent / "other").exists()
    # a function is asked only when a key is needed: an unencrypted repository never asks
    plain = repo_path.parent / "plain"
    Repository.open(str(plain), create=True, config=RepoConfig(), credential=nobody).close()
    assert not Repository.open(str(plain), credential=nobody).encrypted and asked == [False, True]


def test_write_only_slot_adds_and_dedups_but_cannot_read(repo_path: Path) -> None:
    full = create(repo_path)
    data = chunks()
    first = write_point(full, data)
    wo_cred = Credential("passphrase", b"hypervisor password", "test")
    slot = full.add_key(wo_cred, access=WRITE_ONLY, label="hv1", kdf_time=0)
    assert slot.access == WRITE_ONLY and {s.id for s in full.key_slots()} == {full.slot.id, slot.id}

    wo = reopen(repo_path, wo_cred)
    assert wo.keys is not None and not wo.keys.can_read and wo.slot is not None and wo.slot.id == slot.id
    assert wo.vms() == ["db01"] and wo.manifest("db01", first.id).disks == first.disks  # metadata reads
    fresh = os.urandom(BLOB)
    second = write_point(wo, data + [fresh], vm="web")
    stats = second.disks["d0"].stats
    assert (stats["new_blobs"], stats["dedup_blobs"]) == (1, len(data))  # dedup against the full key's blobs
    blobs = [e[2] for e in second.disks["d0"].extents]
    with pytest.raises(KeyAccessError, match="write-only"):
        list(wo.iter_blobs(blobs))
    with pytest.raises(KeyAccessError):
        wo.read_blob(blobs[-1])
    with pytest.raises(KeyAccessError, match="verify --read-data"):
        verify(wo, read_data=True)
    assert verify(wo).ok  # a metadata-only verify works with a write-only key
    with pytest.raises(KeyAccessError, match="full key"):
        wo.add_key(Credential("passphrase", b"escalation", "test"), kdf_time=0)
    with pytest.raises(KeyAccessError, match="full key slot"):
        wo.remove_key(full.slot.id)
    # what the write-only host wrote reads back with the full key
    back = reopen(repo_path)
    assert back.vms() == ["db01", "web"]
    assert read_disk(back, back.manifest("web", second.id)) == data + [fresh]


def test_key_slots_add_and_remove(repo_path: Path) -> None:
    repo = create(repo_path)
    first = repo.slot
    assert first is not None
    wo = repo.add_key(Credential("passphrase", b"write only", "test"), access=WRITE_ONLY, kdf_time=0)
    with pytest.raises(UsageError, match="the one this command was unlocked with"):
        repo.remove_key(first.id)
    with pytest.raises(UsageError, match="last full-access key"):
        repo.remove_key(first.id, current=True)  # a write-only slot does not count: it could restore nothing
    assert {s.id for s in repo.key_slots()} == {first.id, wo.id}
    key_file = os.urandom(32)
    second = repo.add_key(Credential("keyfile", key_file, "test"), label="ops", kdf_time=0)
    with pytest.raises(UsageError, match="no single key slot"):
        repo.remove_key("")
    with pytest.raises(UsageError, match="no single key slot"):
        repo.remove_key("nonexistent")
    assert reopen(repo_path).remove_key(second.id[:4]).id == second.id  # a unique prefix names a slot
    second = repo.add_key(Credential("keyfile", key_file, "test"), label="ops", kdf_time=0)
    assert repo.remove_key(first.id, current=True).id == first.id  # 'key passwd': its replacement exists
    with pytest.raises(WrongKeyError):
        reopen(repo_path)  # the old password opens nothing now
    by_file = reopen(repo_path, Credential("keyfile", key_file, "test"))
    assert by_file.keys is not None and by_file.keys.can_read and by_file.slot.id == second.id
    assert {s.id for s in by_file.key_slots()} == {second.id, wo.id}
    with pytest.raises(UsageError, match="last full-access key"):
        by_file.remove_key(second.id, current=True)
    assert by_file.remove_key(wo.id).id == wo.id


def test_config_tamper_is_caught_after_unlock(repo_path: Path) -> None:
    create(repo_path)
    config = repo_path / "config"
    original = config.read_bytes()
    doc = json.loads(original)
    doc["chunk_size"] = doc["chunk_size"] // 2  # still valid: only the key can tell it was changed
    fields = {k: v for k, v in doc.items() if k != "sha256"}
    doc["sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    config.write_bytes(json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="config of .* fails authentication with its key"):
        reopen(repo_path)
    config.write_bytes(original)
    assert reopen(repo_path).config.chunk_size == fields["chunk_size"] * 2


def test_a_format_1_config_in_an_encrypted_repository_is_refused(repo_path: Path) -> None:
    repo = create(repo_path)
    write_point(repo, chunks())
    (repo_path / "config").write_bytes(RepoConfig(id=repo.config.id).to_bytes())  # "turn encryption off"
    with pytest.raises(IntegrityError, match=r"holds key slots \(keys/\) but its config says it is not encrypted"):
        reopen(repo_path)
    # a format 1 config that kept the key checksum is refused too
    doc = json.loads(RepoConfig(id=repo.config.id).to_bytes())
    doc["auth"] = repo.config.auth
    fields = {k: v for k, v in doc.items() if k != "sha256"}
    doc["sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (repo_path / "config").write_bytes(json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="unencrypted .* carries a key checksum"):
        reopen(repo_path)


def test_a_format_1_index_planted_in_a_format_2_repository_is_refused(repo_path: Path) -> None:
    repo = create(repo_path)
    write_point(repo, chunks())
    index_id, data = encode_index([("ab" * 32, [])])
    repo.backend.put(f"index/{index_id}", data)
    with pytest.raises(FormatMismatch, match=f"index/{index_id} is a plaintext .*config was replaced"):
        reopen(repo_path).load_index()


def test_object_names_and_bytes_hide_vm_names_and_data(repo_path: Path) -> None:
    repo = create(repo_path)
    text = (b"the quick brown fox jumps over the lazy guest disk " * 8192)[:BLOB]  # compressible
    rnd = os.urandom(BLOB)  # stored raw (zstd cannot shrink it)
    a = write_point(repo, [text, rnd], vm="db01")
    b = write_point(repo, [text], vm="web-frontend")
    names = [info.name for info in repo.backend.list()]
    assert len([n for n in names if n.startswith("points/")]) == 2
    for vm in ("db01", "web-frontend"):
        assert not any(vm in n for n in names), names
        assert any(repo.envelope.vm_key(vm) in n for n in names)
    for path in repo_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"db01" not in content and b"web-frontend" not in content, path
            assert rnd[5000:5064] not in content and b"quick brown fox" not in content, path
            assert hashlib.sha256(rnd).digest() not in content, path  # no unkeyed content hash either
    again = reopen(repo_path)  # a fresh handle learns the names from the manifests alone
    assert again.vms() == ["db01", "web-frontend"] and again.unnamed_vms() == {}
    assert again.point_ids("db01") == [a.id] and again.point_ids("web-frontend") == [b.id]
    # a manifest copied under another point's name does not open there (sealed to its own name)
    token = repo.envelope.vm_key("db01")
    moved = f"points/{token}/{new_point_id()}"
    repo.backend.put(moved, repo.backend.get(f"points/{token}/{a.id}"))
    with pytest.raises(IntegrityError, match="fails authentication"):
        reopen(repo_path).manifest("db01", moved.rsplit("/", 1)[1])


def test_rebuild_index_on_format_2(repo_path: Path) -> None:
    repo = create(repo_path, pack_target=1 << 20)
    data = chunks() + [os.urandom(BLOB) for _ in range(4)]  # > 1 MiB: more than one pack
    m = write_point(repo, data)
    before = {(e[2], repo.locate(e[2])) for e in m.disks["d0"].extents}
    packs = list(repo.backend.list("data/"))
    assert len(packs) >= 2
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)
    fresh = reopen(repo_path)
    with pytest.raises(IntegrityError, match="not in the repository index"):
        read_disk(fresh, fresh.manifest("db01", m.id))
    report = fresh.rebuild_index()
    assert (report.ok, report.packs, report.blobs) == (True, len(packs), len(data))
    assert fresh.backend.get(report.index).startswith(MAGIC2)
    assert {(e[2], fresh.locate(e[2])) for e in m.disks["d0"].extents} == before  # headers included
    assert read_disk(reopen(repo_path), m) == data


def test_verify_read_data_on_format_2_finds_a_tampered_payload(repo_path: Path) -> None:
    repo = create(repo_path)
    data = chunks()
    m = write_point(repo, data)
    report = verify(reopen(repo_path), read_data=True)
    assert report.ok and report.blobs_checked == len(data) and report.bytes_read == sum(map(len, data))
    blob = m.disks["d0"].extents[1][2]
    loc = repo.locate(blob)
    path = repo_path / pack_name(loc.pack)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x01  # inside the sealed ciphertext: the size stays right
    path.write_bytes(bytes(raw))
    assert verify(reopen(repo_path)).ok  # without reading data nothing shows
    report = verify(reopen(repo_path), read_data=True)
    assert not report.ok and [p.id for p in report.points if not p.ok] == [m.id]
    (problem,) = [p for p in report.points if not p.ok][0].problems
    assert blob.hex() in problem and "authentication" in problem
    assert report.blobs_checked == len(data) - 1


def test_discard_if_new_removes_an_encrypted_repository_entirely(tmp_path: Path) -> None:
    path = tmp_path / "new" / "repo"
    repo = create(path)
    assert any((path / "keys").iterdir())
    with repo.writer() as w:  # a failed first run leaves packs and an index behind, but no point
        w.add(os.urandom(BLOB))
        w.flush()
    assert repo.discard_if_new()
    repo.close()
    assert not path.exists() and not (tmp_path / "new").exists()
    # a repository with a committed point stays, keys and all
    kept = create(tmp_path / "kept")
    write_point(kept, chunks()[2:])
    assert not kept.discard_if_new()
    assert any((tmp_path / "kept" / "keys").iterdir()) and reopen(tmp_path / "kept").vms() == ["db01"]


def test_an_index_claiming_more_tables_than_any_repository_has_is_damage(master: MasterKey,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """zstandard allocates what a frame's header claims: a planted index claiming terabytes must be an
    integrity error naming it, not a MemoryError (the bound is lowered here to make a real index exceed it)."""
    from fleece.repository import index as index_module

    index_id, data = encode_index(records(master), master.meta)
    assert decode_index(index_id, data, master.meta)
    monkeypatch.setattr(index_module, "MAX_INDEX_BODY", 64)
    with pytest.raises(IntegrityError, match=f"index/{index_id} claims .* bytes of tables") as info:
        decode_index(index_id, data, master.meta)
    assert info.value.object == f"index/{index_id}"
