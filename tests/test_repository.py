"""Repository format v1 end to end on the local backend: writer, index, manifests, corruption."""

from __future__ import annotations

import glob
import json
import os
import threading
from pathlib import Path

import pytest

from fleece.repository import (DiskRecord, IntegrityError, Manifest, RepoConfig, Repository, RepositoryError,
                        new_point_id)
from fleece.repository.pack import PackBuilder, verify_pack_bytes
from fleece.repository.codec import Codec, ENCODING_RAW, ENCODING_ZSTD

CHUNK = 4 << 20


def sample_chunks() -> list[bytes]:
    """Compressible text, random bytes, a mostly-zero chunk and a short tail: the kinds a disk holds."""
    text = b"".join(Path(p).read_bytes() for p in sorted(glob.glob("/usr/lib/python3.11/json/*.py")))
    text = (text * (CHUNK // len(text) + 1))[:CHUNK]
    return [text, os.urandom(CHUNK), b"\0" * (CHUNK - 512) + os.urandom(512), os.urandom(12345)]


def write_point(repo: Repository, chunks: list[bytes], vm: str = "vm1", parent: str | None = None) -> Manifest:
    extents = []
    lock = threading.Lock()
    with repo.writer() as w:
        for i, data in enumerate(chunks):
            def done(ident: bytes, stored: int, off: int = i * CHUNK, n: int = len(data)) -> None:
                with lock:
                    extents.append((off, n, ident))
            w.add(data, done)
        stats = w.flush()
    m = Manifest(new_point_id(), vm, "2026-11-26T00:00:00Z", parent, "full" if parent is None else "incremental",
                 {"d0": DiskRecord("full", len(chunks) * CHUNK, sorted(extents), stats=stats.as_dict())})
    repo.commit(m)
    return m


def read_disk(repo: Repository, m: Manifest, disk: str = "d0") -> dict[int, bytes]:
    return {p.offset: repo.read_blob(p.blob)[p.skip:p.skip + p.length] for p in repo.resolve(m, disk) if p.blob}


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(str(tmp_path / "repo"), create=True)


def test_roundtrip_and_reopen(repo: Repository, tmp_path: Path) -> None:
    chunks = sample_chunks()
    m = write_point(repo, chunks)
    again = Repository.open(f"file://{tmp_path / 'repo'}")  # fresh process view: no caches
    got = again.find_point("vm1", "latest")
    assert got.id == m.id and got.disks["d0"].extents == m.disks["d0"].extents
    assert read_disk(again, got) == {i * CHUNK: c for i, c in enumerate(chunks)}


def test_compression_and_raw_fallback() -> None:
    codec = Codec(3)
    text, rnd, _, _ = sample_chunks()
    enc = codec.encode(text)
    assert enc.encoding == ENCODING_ZSTD and len(enc.payload) < len(text) // 2
    enc_rnd = codec.encode(rnd)
    assert enc_rnd.encoding == ENCODING_RAW and enc_rnd.payload == rnd
    assert codec.decode(enc.payload, len(text), enc.encoding, enc.id, "test") == text


def test_pack_roundtrip() -> None:
    codec = Codec(3)
    blobs = [codec.encode(c) for c in sample_chunks()]
    b = PackBuilder(32 << 20)
    for e in blobs:
        b.add(e)
    pack_id, view, entries = b.finish()
    data = bytes(view)
    table = verify_pack_bytes(pack_id, data)
    assert table == entries
    for e, blob in zip(table, blobs):
        assert codec.decode(data[e.offset:e.offset + e.length], e.raw_length, e.encoding, e.id, pack_id) \
            is not None
        assert e.id == blob.id
    damaged = bytearray(data)
    damaged[-100] ^= 1  # inside the table
    with pytest.raises(IntegrityError, match="garbled"):
        verify_pack_bytes(pack_id, bytes(damaged))
    with pytest.raises(IntegrityError, match="no valid footer"):
        verify_pack_bytes(pack_id, data[:-1])


def test_dedup_within_and_across_runs(repo: Repository) -> None:
    text = sample_chunks()[0]
    first = write_point(repo, [text, text, text])
    assert first.disks["d0"].stats["new_blobs"] == 1
    assert first.disks["d0"].stats["dedup_blobs"] == 2
    packs_before = {i.name for i in repo.backend.list("data/")}
    second = write_point(repo, [text], parent=first.id)
    assert second.disks["d0"].stats["new_blobs"] == 0
    assert second.disks["d0"].stats["uploaded_bytes"] == 0
    assert {i.name for i in repo.backend.list("data/")} == packs_before
    # a new repository object (another host) dedups too, through the index
    other = Repository.open(repo.url)
    third = write_point(other, [text], vm="vm2")
    assert third.disks["d0"].stats["new_blobs"] == 0


def test_packs_are_bounded_by_pack_target(tmp_path: Path) -> None:
    cfg = RepoConfig(pack_target=1 << 20)
    repo = Repository.open(str(tmp_path / "small"), create=True, config=cfg)
    write_point(repo, [os.urandom(CHUNK // 2) for _ in range(6)])
    sizes = [i.size for i in repo.backend.list("data/")]
    assert len(sizes) == 6  # each random 2 MiB blob overflows the 1 MiB target: one pack each
    assert len(list(repo.backend.list("index/"))) == 1


def test_index_rebuilt_from_packs_alone(repo: Repository) -> None:
    chunks = sample_chunks()
    m = write_point(repo, chunks)
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)
    fresh = Repository.open(repo.url)
    with pytest.raises(IntegrityError, match="not in the repository index"):
        read_disk(fresh, fresh.manifest("vm1", m.id))
    report = fresh.rebuild_index()
    assert (report.packs, report.blobs, report.ok) == (1, 4, True)
    assert [i.name for i in fresh.backend.list("index/")] == [report.index]
    assert read_disk(fresh, fresh.manifest("vm1", m.id)) == {i * CHUNK: c for i, c in enumerate(chunks)}


# -- format and corruption checks -----------------------------------------------------------------------

def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository.open(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no fleece repository.*fleece init"):
        Repository.open(str(tmp_path / "empty"))


def test_unknown_format_version(repo: Repository) -> None:
    cfg = json.loads(repo.backend.get("config"))
    cfg["format"] = 99
    repo.backend.put("config", json.dumps(cfg).encode())
    with pytest.raises(RepositoryError, match="format 99.*knows formats 1, 2"):
        Repository.open(repo.url)


def test_garbled_config(repo: Repository) -> None:
    repo.backend.put("config", b'{"format": 1, "id": ')
    with pytest.raises(IntegrityError, match="config is garbled"):
        Repository.open(repo.url)


def test_truncated_pack_detected(repo: Repository) -> None:
    m = write_point(repo, sample_chunks())
    (pack,) = list(repo.backend.list("data/"))
    path = Path(repo.backend.location) / pack.name
    with open(path, "r+b") as f:
        f.truncate(pack.size - 1000)
    fresh = Repository.open(repo.url)
    with pytest.raises(IntegrityError, match=pack.name.rsplit("/", 1)[1][:16]):
        read_disk(fresh, fresh.manifest("vm1", m.id))
    # rebuild-index salvages instead of stopping: the pack is reported by name, with the point needing it
    report = fresh.rebuild_index()
    assert not report.ok and list(report.damaged) == [pack.name]
    assert "no valid footer" in report.damaged[pack.name]
    assert list(report.points) == [f"vm1/{m.id}"] and pack.name in report.points[f"vm1/{m.id}"][0]


def test_flipped_byte_in_pack_detected(repo: Repository) -> None:
    chunks = sample_chunks()
    m = write_point(repo, chunks)
    (pack,) = list(repo.backend.list("data/"))
    path = Path(repo.backend.location) / pack.name
    raw = bytearray(path.read_bytes())
    # flip one byte inside the random (stored raw) blob: only its id check can notice
    loc = repo.load_index().lookup(m.disks["d0"].extents[1][2])
    raw[loc.offset + 777] ^= 0x40
    path.write_bytes(bytes(raw))
    fresh = Repository.open(repo.url)
    with pytest.raises(IntegrityError, match=f"blob {m.disks['d0'].extents[1][2].hex()}.*pack {loc.pack}"):
        read_disk(fresh, fresh.manifest("vm1", m.id))


def test_truncated_index_detected(repo: Repository) -> None:
    write_point(repo, sample_chunks())
    (idx,) = list(repo.backend.list("index/"))
    repo.backend.put(idx.name, repo.backend.get(idx.name)[:-10])
    with pytest.raises(IntegrityError, match=f"{idx.name}.*rebuild-index"):
        Repository.open(repo.url).load_index()


def test_garbled_manifest_detected(repo: Repository) -> None:
    m = write_point(repo, sample_chunks())
    name = f"points/vm1/{m.id}"
    doc = json.loads(repo.backend.get(name))
    doc["manifest"]["disks"]["d0"]["virtual_size"] += 1
    repo.backend.put(name, json.dumps(doc).encode())
    fresh = Repository.open(repo.url)
    with pytest.raises(IntegrityError, match="garbled"):
        fresh.manifest("vm1", m.id)
    scan = fresh.scan("vm1")
    assert scan.points == [] and list(scan.damaged) == [m.id]


def test_missing_parent_breaks_chain(repo: Repository) -> None:
    base = write_point(repo, sample_chunks()[:1])
    inc = Manifest(new_point_id(), "vm1", "x", base.id, "incremental",
                   {"d0": DiskRecord("incremental", CHUNK, [(0, 4096, None)])})
    repo.commit(inc)
    repo.backend.delete(f"points/vm1/{base.id}")
    fresh = Repository.open(repo.url)
    with pytest.raises(IntegrityError, match=f"parent point {base.id}.*missing"):
        fresh.resolve(fresh.manifest("vm1", inc.id), "d0")


def test_commit_is_create_only(repo: Repository) -> None:
    m = write_point(repo, sample_chunks()[:1])
    repo.commit(m)  # the same manifest again (a retried PUT whose reply was lost): a success, no change
    other = Manifest(m.id, m.vm, m.created, None, "full", {"d0": DiskRecord("full", CHUNK, [])})
    with pytest.raises(RepositoryError, match="already exists"):
        repo.commit(other)  # a different point under the same id never replaces the committed one
    assert Repository.open(repo.url).manifest("vm1", m.id).disks["d0"].extents == m.disks["d0"].extents


def test_unknown_point_lists_existing(repo: Repository) -> None:
    m = write_point(repo, sample_chunks()[:1])
    with pytest.raises(RepositoryError, match=m.id):
        repo.find_point("vm1", "20990101T000000.000Z-deadbeef")
    with pytest.raises(RepositoryError, match="VMs in this repository: vm1"):
        repo.find_point("other", None)


def test_writer_error_surfaces_and_commits_nothing(repo: Repository) -> None:
    """An upload failure must reach the caller; no manifest can be written for that run."""
    calls = []

    def broken_put(name: str, data: bytes) -> None:
        calls.append(name)
        raise OSError("disk on fire")

    repo.backend.put = broken_put  # type: ignore[method-assign]
    w = repo.writer()
    with pytest.raises(RepositoryError, match="disk on fire"):
        for _ in range(20):
            w.add(os.urandom(CHUNK))
        w.flush()
    w.abort()
    assert calls and list(repo.backend.list("points/")) == []


def test_compression_level_is_the_repository_s(tmp_path: Path) -> None:
    """The level chosen at creation is stored in ``config`` and used by every later writer."""
    text = sample_chunks()[0]
    sizes = {}
    for level in (1, 19):
        url = str(tmp_path / f"repo{level}")
        Repository.open(url, create=True, config=RepoConfig(compression={"algorithm": "zstd", "level": level}))
        again = Repository.open(url)
        assert again.config.compression["level"] == level
        m = write_point(again, [text])
        sizes[level] = m.disks["d0"].stats["stored_bytes"]
        assert read_disk(again, m) == {0: text}
    assert sizes[19] < sizes[1]


def test_out_of_range_compression_level_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="zstd level 25"):
        Repository.open(str(tmp_path / "r"), create=True,
                        config=RepoConfig(compression={"algorithm": "zstd", "level": 25}))


# -- progress: what the writer reports as committed ------------------------------------------------------

def test_writer_reports_committed_bytes_once_durable(tmp_path: Path) -> None:
    """``on_committed`` counts a pack's plaintext only once the pack is in the repository; a duplicate
    counts when found (nothing to upload); together they add up to every byte handed to the writer."""
    repo = Repository.open(str(tmp_path / "r"), create=True, config=RepoConfig(pack_target=1 << 20))
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def committed(raw: int, stored: int) -> None:
        held = sum(i.size for i in repo.backend.list("data/"))  # what is durable right now
        with lock:
            calls.append((raw, stored, held))

    blobs = [os.urandom(CHUNK // 4) for _ in range(5)]
    with repo.writer(on_committed=committed) as w:
        for data in blobs + blobs[:2]:  # the last two are duplicates
            w.add(data)
        w.flush()
    assert sum(raw for raw, _, _ in calls) == sum(len(b) for b in blobs + blobs[:2])
    assert sorted(raw for raw, stored, _ in calls if stored == 0) == [CHUNK // 4] * 2
    packs = sum(i.size for i in repo.backend.list("data/"))
    assert sum(stored for _, stored, _ in calls) == packs
    assert all(stored <= held for _, stored, held in calls if stored)  # reported after its upload, never before


# -- config checksum ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("old,new", [
    ('"pack_target": 20971520', '"pack_target": 20971521'),  # still a valid pack size: only the sum notices
    ('"level": 3', '"level": 4'),  # another valid level
    ('"chunk_size": 4194304', '"chunk_size": 4194305'),
])
def test_config_with_an_edited_digit_is_refused(repo: Repository, old: str, new: str) -> None:
    text = repo.backend.get("config").decode()
    assert text.count(old) == 1 and '"sha256"' in text
    repo.backend.put("config", text.replace(old, new).encode())
    with pytest.raises(IntegrityError, match="does not match its sha256 checksum.*put back the original config"):
        Repository.open(repo.url)


def test_config_checksum_itself_damaged(repo: Repository) -> None:
    cfg = json.loads(repo.backend.get("config"))
    digit = cfg["sha256"][0]
    cfg["sha256"] = ("1" if digit != "1" else "2") + cfg["sha256"][1:]
    repo.backend.put("config", json.dumps(cfg).encode())
    with pytest.raises(IntegrityError, match="checksum"):
        Repository.open(repo.url)


def test_config_without_checksum_still_opens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Repositories created before the checksum existed keep working (and their config is not rewritten)."""
    repo = Repository.open(str(tmp_path / "old"), create=True, config=RepoConfig(pack_target=2 << 20))
    legacy = {k: v for k, v in json.loads(repo.backend.get("config")).items() if k != "sha256"}
    data = (json.dumps(legacy, indent=1, sort_keys=True) + "\n").encode()  # what fleece wrote before
    repo.backend.put("config", data)
    with caplog.at_level("DEBUG", logger="fleece.repository.config"):
        again = Repository.open(repo.url)
    assert again.config == repo.config and again.config.pack_target == 2 << 20
    assert "no checksum" in caplog.text
    write_point(again, [os.urandom(12345)])
    assert again.backend.get("config") == data


def test_cli_on_an_edited_config_says_one_line(repo: Repository) -> None:
    from checks import fleece

    text = repo.backend.get("config").decode()
    repo.backend.put("config", text.replace('"pack_target": 20971520', '"pack_target": 20971528').encode())
    p = fleece("list", "--repo", repo.url)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleece: error: ") and "config" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


# -- fleece list: disks and host ---------------------------------------------------------------------------

def test_list_shows_disks_and_host(repo: Repository) -> None:
    """Each point's disks and the host it was taken on, in both outputs; older points without a machine
    record show the plain ``extra.host`` they carry, or nothing (``-``)."""
    from checks import fleece

    def point(extra: dict[str, object], disks: tuple[str, ...]) -> Manifest:
        m = Manifest(new_point_id(), "vm1", "2026-11-26T00:00:00Z", None, "full",
                     {d: DiskRecord("full", CHUNK, []) for d in disks}, extra=extra)
        repo.commit(m)
        return m

    old = point({}, ("vda",))
    plain = point({"host": "hostB"}, ("vda",))
    new = point({"host": "ignored", "machine": {"uuid": None, "host": "hostA", "images": {}}}, ("vda", "vdb"))
    p = fleece("list", "--repo", repo.url, "--json")
    assert p.returncode == 0, p.stderr
    by_id = {pt["id"]: pt for pt in json.loads(p.stdout)["points"]}
    assert [by_id[m.id]["host"] for m in (old, plain, new)] == [None, "hostB", "hostA"]
    assert set(by_id[new.id]["disks"]) == {"vda", "vdb"}
    p = fleece("list", "--repo", repo.url)
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()}
    assert " disks=vda host=- " in lines[old.id] and " disks=vda host=hostB " in lines[plain.id]
    assert " disks=vda,vdb host=hostA " in lines[new.id]
    assert len(p.stdout.splitlines()) == 3


def test_discard_if_new_takes_back_only_what_this_run_made(tmp_path: Path) -> None:
    """A failed first backup leaves no --repo: the objects this handle wrote and the directory it made
    go; what another writer stored meanwhile (and then the config) stays; an old repository is never touched."""
    from fleece.repository import Repository

    parent = tmp_path / "new" / "deeper"
    repo = Repository.open(str(parent / "repo"), create=True)
    assert repo.created
    repo.backend.put("data/ab/" + "ab" * 32, b"orphan pack of the failed run")
    assert repo.discard_if_new()
    assert not (tmp_path / "new").exists()

    repo = Repository.open(str(tmp_path / "repo2"), create=True)
    other = Repository.open(str(tmp_path / "repo2"))  # a second run, filling the same new repository
    assert not other.created
    other.backend.put("data/cd/" + "cd" * 32, b"someone else's pack")
    repo.backend.put("data/ab/" + "ab" * 32, b"ours")
    assert not repo.discard_if_new()
    names = {i.name for i in other.backend.list()}
    assert names == {"config", "data/cd/" + "cd" * 32}

    again = Repository.open(str(tmp_path / "repo2"), create=True)  # exists: not "created" by this handle
    assert not again.created and not again.discard_if_new()
    assert (tmp_path / "repo2" / "config").exists()


def test_commit_puts_back_a_config_a_racing_failed_first_run_took(tmp_path: Path) -> None:
    """Two first backups race into one new repository; the one that fails takes the repository back
    (only the config is there yet) while the other is running. The survivor's commit restores the config,
    byte for byte, so its point stays readable under the same repository id."""
    from fleece.repository import Repository
    from fleece.repository.manifest import DiskRecord, Manifest, new_point_id

    url = str(tmp_path / "repo")
    failing = Repository.open(url, create=True)
    survivor = Repository.open(url, create=True)
    assert failing.created and not survivor.created
    config = (tmp_path / "repo" / "config").read_bytes()
    assert failing.discard_if_new()
    assert not (tmp_path / "repo" / "config").exists()
    m = Manifest(new_point_id(), "vm", "2026-12-02T00:00:00Z", None, "full", {"d0": DiskRecord("full", 4096, [])})
    survivor.commit(m)
    assert (tmp_path / "repo" / "config").read_bytes() == config
    again = Repository.open(url)
    assert again.config.id == survivor.config.id and [p.id for p in again.scan("vm").points] == [m.id]
