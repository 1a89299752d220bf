"""Restore's direct targets (restore/direct.py) and its fill pipeline (restore/fill.py), without a VM.

* :class:`DirectFile` on real files: which bytes go ``O_DIRECT`` (``direct_bytes``) and which buffered,
  the guest→host mapping of a preallocated qcow2, the fallback where a filesystem refuses ``O_DIRECT``,
  and that ``close`` leaves no descriptor behind. Every file is compared byte for byte with a
  ``bytearray`` model.
* :class:`PreallocatedQcow2` with the real ``qemu-img``: a sparse 1.5 GiB image (three extents in
  ``qemu-img map``), data across an extent boundary, ``qemu-img compare``/``check``/``map``, exact modes
  whatever the umask, the cluster size asked for.
* :func:`zero_runs` on exact grain layouts, and :func:`fill` end to end from a real local repository
  (plaintext and encrypted) into both direct targets and, for overlays (``mask``), through qemu-nbd.

Images are a few MiB of data at most; the 1.5 GiB qcow2 is virtual and sparse.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from checks import identical, qemu_img
from fleece.repository import IntegrityError, Piece, RepoConfig, Repository
from fleece.repository.credentials import Credential
from fleece.repository.errors import RestoreError
from fleece.repository.pack import pack_name
from fleece.restore.direct import ALIGN, DirectFile, PreallocatedQcow2, RawTarget, guest_to_host
from fleece.restore.fill import FillStats, fill, zero_runs
from fleece.restore.targets import ZERO_GRAIN, QemuNbdTarget, create_qcow2

KiB, MiB = 1 << 10, 1 << 20
PW = Credential("passphrase", b"pw", "test")
CH = 256 * KiB  #: the repositories' chunk size: the largest blob
FORMATS = ["plain", "encrypted"]


# -- helpers ---------------------------------------------------------------------------------------------

def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def page_buffer(data: bytes) -> memoryview:
    """*data* in anonymous mmap memory: page-aligned, as restore's decode buffers are."""
    m = mmap.mmap(-1, max(len(data), 1))
    m[:len(data)] = data
    return memoryview(m)[:len(data)]


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def direct_open_works(path: Path) -> bool:
    """The test's own probe of O_DIRECT on *path*'s filesystem (independent of the code under test)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


# -- DirectFile: which bytes go O_DIRECT, and that all of them land exactly --------------------------------

def test_direct_file_writes_aligned_middles_direct_and_the_rest_buffered(tmp_path: Path) -> None:
    size = 256 * KiB
    path = sparse_file(tmp_path / "f", size)
    assert direct_open_works(path), "the test directory must take O_DIRECT"
    model = bytearray(size)
    f = DirectFile(path)
    assert f.direct
    expected_direct = 0

    def write(data: bytes, offset: int, *, page_offset: int = 0, expect: int) -> None:
        """Write *data* from a page-aligned buffer shifted by *page_offset* bytes (0: aligned memory)."""
        nonlocal expected_direct
        buf = page_buffer(bytes(page_offset) + data)[page_offset:]
        before = f.direct_bytes
        f.write(buf, offset, page_offset % ALIGN == 0)
        model[offset:offset + len(data)] = data
        assert f.direct_bytes - before == expect, (offset, len(data), page_offset)
        expected_direct += expect

    write(rand(8 * KiB, 1), 0, expect=8 * KiB)  # all aligned: all direct
    write(rand(4096 * 3 + 100, 2), 16 * KiB, expect=4096 * 3)  # aligned middle direct, 100-byte tail buffered
    write(rand(300, 3), 16 * KiB + 4096 * 3 + 100, expect=0)  # shares the tail's page: buffered
    write(rand(8 * KiB, 4), 40 * KiB + 512, expect=0)  # a 512-byte offset is not ALIGN-aligned: buffered
    write(rand(8 * KiB, 5), 56 * KiB, page_offset=100, expect=0)  # memory not page-aligned: buffered
    write(rand(8 * KiB, 6), 72 * KiB, page_offset=512, expect=0)  # 512-aligned memory is not enough
    write(rand(1000, 7), 88 * KiB, expect=0)  # shorter than a page: nothing to go direct
    # neighbours sharing pages: three unaligned writes inside and across one page boundary
    write(rand(200, 8), 100 * KiB + 100, expect=0)
    write(rand(3000, 9), 100 * KiB + 300, expect=0)
    write(rand(5000, 10), 100 * KiB + 3300, expect=0)
    # a direct write right after a buffered one ending on the page boundary, then one at the file's end
    write(rand(4096 - 17, 11), 120 * KiB + 17, expect=0)
    write(rand(12 * KiB, 12), 124 * KiB, expect=12 * KiB)
    write(rand(4096 + 1, 13), size - 4096 - 1, expect=0)
    assert f.direct_bytes == expected_direct
    f.close()
    assert path.read_bytes() == model


def test_direct_file_zero_writes_zeros_as_data(tmp_path: Path) -> None:
    """``zero`` (an overlay's masking, never used on a fresh file) overwrites data with zeros, in blocks."""
    size = 3 * MiB
    path = tmp_path / "f"
    data = rand(size, 20)
    path.write_bytes(data)
    model = bytearray(data)
    f = DirectFile(path)
    f.zero((1 << 20) + 5000, 700)  # more than one 1 MiB block, unaligned both ends
    model[700:700 + (1 << 20) + 5000] = bytes((1 << 20) + 5000)
    f.close()
    assert path.read_bytes() == model


def test_extents_map_guest_offsets_to_host_offsets(tmp_path: Path) -> None:
    """A write crossing from one extent into the next lands at both host places, the aligned-memory flag
    following the data (after an unaligned first part the rest of the buffer is not page-aligned)."""
    size = 64 * KiB
    path = sparse_file(tmp_path / "f", size)
    # guest [0, 10 KiB) → host 32 KiB; guest [10 KiB, 26 KiB) → host 8 KiB; guest [26 KiB, 30 KiB) → host 0
    extents = [(0, 10 * KiB, 32 * KiB), (10 * KiB, 16 * KiB, 8 * KiB), (26 * KiB, 4 * KiB, 0)]

    def host(guest: int) -> int:
        for start, length, at in extents:
            if start <= guest < start + length:
                return at + guest - start
        raise AssertionError(guest)

    guest_model = bytearray(30 * KiB)
    f = DirectFile(path, extents)

    # guest 4 KiB..16 KiB: 6 KiB at host 36 KiB (4 KiB direct + 2 KiB buffered), then 6 KiB at host 8 KiB
    # from memory 6 KiB into the buffer: not page-aligned any more, so buffered
    a = rand(12 * KiB, 30)
    f.write(page_buffer(a), 4 * KiB, True)
    guest_model[4 * KiB:16 * KiB] = a
    assert f.direct_bytes == 4 * KiB
    # guest 18 KiB..30 KiB: 8 KiB at host 16 KiB (aligned, direct) then 4 KiB at host 0 (still aligned: direct)
    b = rand(12 * KiB, 31)
    f.write(page_buffer(b), 18 * KiB, True)
    guest_model[18 * KiB:30 * KiB] = b
    assert f.direct_bytes == 4 * KiB + 12 * KiB
    # an unaligned write across the first boundary
    c = rand(3000, 32)
    f.write(memoryview(c), 10 * KiB - 1000, False)
    guest_model[10 * KiB - 1000:10 * KiB + 2000] = c
    f.close()

    got = path.read_bytes()
    host_model = bytearray(size)
    written = [range(4 * KiB, 16 * KiB), range(18 * KiB, 30 * KiB), range(10 * KiB - 1000, 10 * KiB + 2000)]
    for g in range(len(guest_model)):
        if any(g in r for r in written):
            host_model[host(g)] = guest_model[g]
    assert got == host_model
    # nothing outside the extents' host places was touched
    assert got[4 * KiB:8 * KiB] + got[24 * KiB:32 * KiB] + got[42 * KiB:] == bytes(4 * KiB + 8 * KiB + size - 42 * KiB)


@pytest.mark.parametrize("offset, length", [(4 * KiB, 100), (8 * KiB - 1, 1), (12 * KiB, 1), (0, 100),
                                            (2 * KiB, 4 * KiB)])
def test_guest_offset_outside_every_extent_is_refused(tmp_path: Path, offset: int, length: int) -> None:
    """A gap between extents, before the first and after the last: RestoreError, never a stray write."""
    path = sparse_file(tmp_path / "f", 64 * KiB)
    extents = [(1 * KiB, 3 * KiB, 16 * KiB), (8 * KiB, 4 * KiB, 32 * KiB)]  # guest [1K,4K) and [8K,12K)
    f = DirectFile(path, extents)
    try:
        with pytest.raises(RestoreError, match="has no place in the preallocated image"):
            f.write(memoryview(rand(length, 40)), offset, False)
    finally:
        f.close()


def test_filesystem_without_o_direct_gets_buffered_writes() -> None:
    """tmpfs refused O_DIRECT before Linux 6.6: DirectFile then writes everything buffered, exactly."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = shm / f"fleece-test-direct-{os.getpid()}"
    sparse_file(path, 64 * KiB)
    try:
        if direct_open_works(path):
            pytest.skip(f"tmpfs on this kernel ({os.uname().release}) takes O_DIRECT: no filesystem "
                        "without it to test the fallback on")
        assert_buffered_throughout(path, 50)
    finally:
        path.unlink(missing_ok=True)


def assert_buffered_throughout(path: Path, seed: int) -> None:
    """Writes aligned and not on a 64 KiB file where O_DIRECT is refused: all buffered, all exact."""
    f = DirectFile(path)
    assert not f.direct
    model = bytearray(64 * KiB)
    for data, offset in [(rand(16 * KiB, seed), 0), (rand(4096 * 3 + 100, seed + 1), 20 * KiB),
                         (rand(5000, seed + 2), 512)]:
        f.write(page_buffer(data), offset, offset % ALIGN == 0)
        model[offset:offset + len(data)] = data
    assert f.direct_bytes == 0
    f.close()
    assert path.read_bytes() == model


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback where the real thing is missing here (this kernel's tmpfs takes O_DIRECT): the open
    with O_DIRECT fails with EINVAL, as on tmpfs before Linux 6.6 and some FUSE mounts — every byte is then
    written buffered, exactly; any other error of that open is a RestoreError, not a silent fallback."""
    import errno

    from fleece.restore import direct as direct_mod

    real_open = os.open
    refusal = [errno.EINVAL]

    def no_direct(path, flags, *args):  # noqa: ANN001, ANN202 - os.open's own signature
        if flags & os.O_DIRECT:
            raise OSError(refusal[0], os.strerror(refusal[0]))
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_mod.os, "open", no_direct)
    path = sparse_file(tmp_path / "f", 64 * KiB)
    assert_buffered_throughout(path, 53)
    refusal[0] = errno.EACCES
    with pytest.raises(RestoreError):
        DirectFile(path)


def test_close_syncs_and_closes_both_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sparse_file(tmp_path / "f", 16 * KiB)
    before = open_fds()
    f = DirectFile(path)
    assert open_fds() == before + 2
    f.write(page_buffer(rand(8 * KiB, 60)), 0, True)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    f.close()
    assert len(synced) == 1  # one fsync: both descriptors are one inode
    assert open_fds() == before
    target = RawTarget(tmp_path / "raw", 16 * KiB)  # a target's close is its file's
    assert open_fds() == before + 2
    target.close()
    assert open_fds() == before
    assert len(synced) == 2


# -- PreallocatedQcow2 and guest_to_host, with the real qemu-img ---------------------------------------------

BIG = 1536 * MiB  #: three L2 tables' worth with 64 KiB clusters: three extents in qemu-img map


def qemu_map(image: Path) -> list[dict]:
    p = qemu_img("map", "--output=json", "-f", "qcow2", str(image))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_preallocated_qcow2_is_qemu_exact_across_extents(tmp_path: Path) -> None:
    image = tmp_path / "p.qcow2"
    target = PreallocatedQcow2(image, BIG, {})
    extents = guest_to_host(image, BIG)
    assert [e[0] for e in extents] == [0, 512 * MiB, 1024 * MiB], extents  # the premise of the crossing write
    assert all(e[2] % ALIGN == 0 for e in extents)
    hosts = [(e[2], e[2] + e[1]) for e in extents]
    assert all(a[1] <= b[0] for a, b in zip(hosts, hosts[1:])), "host places overlap"

    writes = [
        (0, rand(4096 * 3 + 100, 70), 0),  # (guest offset, data, offset of the data in its page buffer)
        (512 * MiB - 8 * KiB, rand(16 * KiB + 512, 71), 0),  # crosses into the second extent
        (1024 * MiB + 512, rand(5000, 72), 512),  # unaligned everywhere
        (BIG - 4096, rand(4096, 73), 0),  # the last page of the disk
    ]
    w = target.writer()
    for offset, data, shift in writes:
        w.pwrite(page_buffer(bytes(shift) + data)[shift:], offset, shift == 0)
    assert target.file.direct_bytes == 4096 * 3 + 16 * KiB + 4096
    target.close()  # runs qemu-img check itself

    ref = sparse_file(tmp_path / "ref.raw", BIG)
    with open(ref, "r+b") as f:
        for offset, data, _ in writes:
            f.seek(offset)
            f.write(data)
    identical(image, ref, "qcow2")
    check = qemu_img("check", "-f", "qcow2", str(image))
    assert check.returncode == 0, check.stdout + check.stderr

    # every range still preallocated (data), the unwritten ones reading as zero, thin in the file
    entries = qemu_map(image)
    assert all(e["data"] and "offset" in e for e in entries), entries
    assert sum(e["length"] for e in entries) == BIG
    nonzero = [(e["start"], e["start"] + e["length"]) for e in entries if not e["zero"]]
    for offset, data, _ in writes:
        # every written byte is inside some extent QEMU reports as non-zero
        pos = offset
        while pos < offset + len(data):
            hit = [r for r in nonzero if r[0] <= pos < r[1]]
            assert hit, f"written byte {pos} reported as zero: {entries}"
            pos = hit[0][1]
    assert sum(b - a for a, b in nonzero) <= 8 * 64 * KiB, nonzero  # a few clusters, not the disk
    assert os.stat(image).st_blocks * 512 < 4 * MiB  # the file's disk usage is metadata and data


@pytest.mark.parametrize("mode", [0o600, 0o640])
@pytest.mark.parametrize("umask", [0, 0o077])
def test_preallocated_qcow2_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int, umask: int) -> None:
    old = os.umask(umask)
    try:
        target = PreallocatedQcow2(tmp_path / "m.qcow2", BIG, {}, mode=mode)
    finally:
        os.umask(old)
    try:
        assert os.stat(tmp_path / "m.qcow2").st_mode & 0o7777 == mode
    finally:
        target.close()
    assert os.stat(tmp_path / "m.qcow2").st_mode & 0o7777 == mode


def test_preallocated_qcow2_honours_the_cluster_size(tmp_path: Path) -> None:
    image = tmp_path / "c.qcow2"
    target = PreallocatedQcow2(image, BIG, {"cluster_size": 131072})
    data = rand(24 * KiB, 80)
    target.writer().pwrite(page_buffer(data), 512 * MiB - 8 * KiB, True)
    target.close()
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert info["cluster-size"] == 131072 and info["virtual-size"] == BIG and info["format"] == "qcow2"
    ref = sparse_file(tmp_path / "ref.raw", BIG)
    with open(ref, "r+b") as f:
        f.seek(512 * MiB - 8 * KiB)
        f.write(data)
    identical(image, ref, "qcow2")


def test_guest_to_host_refuses_an_image_without_preallocation(tmp_path: Path) -> None:
    image = tmp_path / "thin.qcow2"
    create_qcow2(image, 8 * MiB, {})
    with pytest.raises(RestoreError, match="is not preallocated"):
        guest_to_host(image, 8 * MiB)
    with pytest.raises(RestoreError, match="is not preallocated"):
        PreallocatedQcow2.reopen(image, 8 * MiB)


def test_guest_to_host_refuses_a_size_it_does_not_cover(tmp_path: Path) -> None:
    image = tmp_path / "p.qcow2"
    create_qcow2(image, 8 * MiB, {}, preallocation="metadata")
    assert sum(n for _, n, _ in guest_to_host(image, 8 * MiB)) == 8 * MiB
    with pytest.raises(RestoreError, match="covers"):
        guest_to_host(image, 16 * MiB)


def test_reopened_targets_keep_what_was_written(tmp_path: Path) -> None:
    """``--resume`` reopens the partial image: a preallocated qcow2 whose first half is written maps as
    preallocated still, and writes after the reopen land next to the earlier ones."""
    size = 8 * MiB
    first, second = rand(MiB + 512, 85), rand(3 * MiB, 86)
    ref = sparse_file(tmp_path / "ref.raw", size)
    with open(ref, "r+b") as f:
        f.seek(512)
        f.write(first)
        f.seek(4 * MiB)
        f.write(second)
    for kind in ("raw", "qcow2"):
        image = tmp_path / f"r.{kind}"
        target = RawTarget(image, size) if kind == "raw" else PreallocatedQcow2(image, size, {})
        target.writer().pwrite(first, 512)
        target.close()
        target = RawTarget.reopen(image, size) if kind == "raw" else PreallocatedQcow2.reopen(image, size)
        target.writer().pwrite(page_buffer(second), 4 * MiB, True)
        assert target.file.direct_bytes == len(second)
        target.close()
        identical(image, ref, kind)
    with pytest.raises(RestoreError, match="is not the sparse raw image"):
        RawTarget.reopen(tmp_path / "r.raw", size + 4096)
    (tmp_path / "link.qcow2").symlink_to(tmp_path / "r.qcow2")
    with pytest.raises(RestoreError, match="is not the image a restore was writing"):
        PreallocatedQcow2.reopen(tmp_path / "link.qcow2", size)


# -- zero_runs ---------------------------------------------------------------------------------------------

G = ZERO_GRAIN


def test_zero_runs_follow_the_disk_grid_from_an_unaligned_start() -> None:
    """Data landing at 64 KiB - 4 KiB: its first grain is 4 KiB, the rest 64 KiB on the disk's grid."""
    offset = G - 4096
    n = 4096 + 4 * G + 1000
    data = bytearray(rand(n, 90))
    data[4096:4096 + 2 * G] = bytes(2 * G)  # two whole disk grains of zeros
    data[4096 + 3 * G:] = bytes(G + 1000)  # a zero grain and the zero tail
    data[4096 + 3 * G - 1] = 0  # zeros that do not fill a grain do not count
    assert list(zero_runs(memoryview(data), offset)) == [
        (0, 4096, False), (4096, 4096 + 2 * G, True), (4096 + 2 * G, 4096 + 3 * G, False), (4096 + 3 * G, n, True)]
    # one byte of data makes its whole grain data, wherever the grid puts the grain
    data2 = bytearray(n)
    data2[G - 1] = 1
    assert list(zero_runs(memoryview(data2), 0)) == [(0, G, False), (G, n, True)]
    assert list(zero_runs(memoryview(data2), 1)) == [(0, G - 1, True), (G - 1, 2 * G - 1, False), (2 * G - 1, n, True)]


def test_zero_runs_edge_cases() -> None:
    assert list(zero_runs(memoryview(b""), 12345)) == []
    assert list(zero_runs(memoryview(bytes(3 * G + 7)), G - 4096)) == [(0, 3 * G + 7, True)]
    data = rand(3 * G + 7, 91)
    assert list(zero_runs(memoryview(data), G - 4096)) == [(0, 3 * G + 7, False)]
    assert list(zero_runs(memoryview(bytes(100)), 5)) == [(0, 100, True)]  # inside one grain
    assert list(zero_runs(memoryview(b"\0" * 10 + b"x"), G - 5)) == [(0, 5, True), (5, 11, False)]


# -- fill, end to end, from a real local repository --------------------------------------------------------

def make_repo(path: Path, fmt: str) -> Repository:
    config = RepoConfig.encrypted(chunk_size=CH) if fmt == "encrypted" else RepoConfig(chunk_size=CH)
    return Repository.open(str(path), create=True, config=config, credential=PW)


def store(repo: Repository, blobs: dict[str, bytes]) -> dict[str, bytes]:
    """One writer run over *blobs* (by name); their ids by name."""
    w = repo.writer()
    ids: dict[str, bytes] = {}
    for name, data in blobs.items():
        w.add(data, lambda ident, stored, name=name: ids.__setitem__(name, ident))
    w.flush()
    assert set(ids) == set(blobs)
    return ids


def text(n: int, seed: int) -> bytes:
    """Compressible (zstd stores it compressed, not raw)."""
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"kappa "]
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def with_zero_grains() -> bytes:
    """A whole-chunk blob: 64 KiB data, 128 KiB zeros, 64 KiB data (text: compressed)."""
    return rand(G, 100) + bytes(2 * G) + text(G, 101)


BLOBS = {
    "A": rand(CH, 110),  # used by four pieces
    "B": with_zero_grains(),  # used twice, on and off the grid
    "C": rand(4096 * 5 + 7, 111),  # small, odd
    "D": text(100000, 112),  # odd, compressed
    "E": bytes(CH),  # all zeros: no write at all on a fresh target
}
DISK = 4 * MiB + 1536  #: not a multiple of 4 KiB: the last piece ends in a partial page
M = MiB

#: (offset, length, blob name or None, skip): non-overlapping, in no particular order
LAYOUT = [
    (512 * 3, 5000, "A", 777),  # part of a blob, odd length, unaligned start
    (64 * KiB, CH, "A", 0),  # the whole blob, aligned: direct
    (M + 4096, CH - 8192, "A", 4096),  # aligned skip at an aligned offset: direct
    (2 * M + 100, 10000, "A", 100),  # offset and memory equally unaligned: buffered
    (2 * M + 64 * KiB, 20000, "A", 100),  # aligned offset, memory 100 bytes into a page: buffered
    (M + 512 * KiB, CH, "B", 0),  # zero grains on the disk's grid: a hole
    (3 * M + 12288, CH, "B", 0),  # off the grid: one whole zero grain remains
    (2 * M + 512 * KiB, 64 * KiB, None, 0),  # a zero piece: nothing to write on a fresh target
    (2 * M + 640 * KiB, CH, "E", 0),  # an all-zero blob
    (2 * M + 960 * KiB, 4096 * 5 + 7, "C", 0),
    (3 * M + 512 * KiB + 512, 99997, "D", 3),
    (DISK - 4096 * 5 - 7, 4096 * 5 + 7, "C", 0),  # ends with the disk, in a partial page
    (DISK - 4096 * 5 - 7 - 3000, 3000, "C", 4000),  # right before it, sharing a page
]


def pieces_of(ids: dict[str, bytes], layout: list[tuple[int, int, str | None, int]]) -> list[Piece]:
    spans = sorted((off, off + n) for off, n, _, _ in layout)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "the test's pieces overlap"
    return [Piece(off, n, None if name is None else ids[name], skip) for off, n, name, skip in layout]


def model_of(size: int, layout: list[tuple[int, int, str | None, int]], base: bytes | None = None,
             mask: bool = True) -> bytearray:
    """What the image must read: *base* (a backing file) overwritten by the pieces; with ``mask=False``
    (a fresh image) zero runs are not written, which makes no difference over a zero base."""
    out = bytearray(base if base is not None else bytes(size))
    for off, n, name, skip in layout:
        data = bytes(n) if name is None else BLOBS[name][skip:skip + n]
        if mask:
            out[off:off + n] = data
        else:  # only grains with data are written
            for a, b in grains(off, n):
                if any(data[a - off:b - off]):
                    out[a:b] = data[a - off:b - off]
    return out


def grains(off: int, n: int) -> list[tuple[int, int]]:
    """The disk-aligned ZERO_GRAIN pieces of [off, off+n), in disk offsets (the test's own model)."""
    out, pos = [], off
    while pos < off + n:
        end = min(off + n, (pos // G + 1) * G)
        out.append((pos, end))
        pos = end
    return out


def data_runs(off: int, n: int, blob: bytes) -> list[tuple[int, int]]:
    """The (disk start, disk end) runs of consecutive grains holding data."""
    runs: list[tuple[int, int]] = []
    for a, b in grains(off, n):
        if any(blob[a - off:b - off]):
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
    return runs


def expected_direct(layout: list[tuple[int, int, str | None, int]]) -> int:
    """The bytes that must go O_DIRECT: the whole pages of every data run whose disk offset and place in the
    decode buffer (skip + its start in the piece) are both page-aligned."""
    total = 0
    for off, n, name, skip in layout:
        if name is None:
            continue
        for a, b in data_runs(off, n, BLOBS[name][skip:skip + n]):
            if a % ALIGN == 0 and (skip + a - off) % ALIGN == 0:
                total += (b - a) // ALIGN * ALIGN
    return total


def expected_bytes(layout: list[tuple[int, int, str | None, int]]) -> tuple[int, int]:
    """(data bytes, zero bytes) fill must report for *layout*."""
    data = zeros = 0
    for off, n, name, skip in layout:
        if name is None:
            zeros += n
            continue
        blob = BLOBS[name][skip:skip + n]
        for a, b in grains(off, n):
            if any(blob[a - off:b - off]):
                data += b - a
            else:
                zeros += b - a
    return data, zeros


@pytest.fixture(scope="module", params=FORMATS)
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A repository holding :data:`BLOBS` (one pack) and their ids."""
    path = tmp_path_factory.mktemp("repo") / request.param
    repo = make_repo(path, request.param)
    ids = store(repo, BLOBS)
    repo.close()
    return path, ids


def reopen(path: Path) -> Repository:
    """A fresh handle, as a restore opens it."""
    return Repository.open(str(path), credential=PW)


def read_image(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{image.name}.readback.raw"
    raw.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    return raw.read_bytes()


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_fill_into_direct_targets_is_exact(stored: tuple[Path, dict[str, bytes]], tmp_path: Path, kind: str,
                                          workers: int) -> None:
    path, ids = stored
    repo = reopen(path)
    image = tmp_path / f"disk.{kind}"
    target = RawTarget(image, DISK) if kind == "raw" else PreallocatedQcow2(image, DISK, {})
    seen: list[int] = []
    threads = threading.active_count()
    stats = fill(repo, target, pieces_of(ids, LAYOUT), mask=False, workers=workers, progress=seen.append,
                 where="test fill")
    direct_bytes = target.file.direct_bytes
    target.close()
    assert threading.active_count() == threads

    want = model_of(DISK, LAYOUT)
    got = image.read_bytes() if kind == "raw" else read_image(image, tmp_path)
    assert len(got) == DISK
    if got != want:
        first = next(i for i in range(DISK) if got[i] != want[i])
        raise AssertionError(f"{kind} image differs from the model first at byte {first}")

    data, zeros = expected_bytes(LAYOUT)
    assert (stats.data_bytes, stats.zero_bytes) == (data, zeros)
    assert stats.blobs == len(BLOBS)  # each blob decoded once, however many pieces use it
    assert stats.plain_bytes == sum(len(b) for b in BLOBS.values())
    # progress counts the pieces with a blob (restore_total's unit), zero grains included, zero pieces not
    assert sum(seen) == sum(n for _, n, name, _ in LAYOUT if name is not None)
    assert direct_bytes == expected_direct(LAYOUT)
    assert direct_bytes >= 3 * CH  # (the model's sanity: most of the data went around the page cache)

    if kind == "raw":
        # B's two zero grains on the grid are a hole of the file; the file holds little more than the data
        hole = M + 512 * KiB + G
        fd = os.open(image, os.O_RDONLY)
        try:
            assert os.lseek(fd, hole, os.SEEK_DATA) >= hole + 2 * G
        finally:
            os.close(fd)
        allocated = os.stat(image).st_blocks * 512
        total = sum(n for _, n, name, _ in LAYOUT if name is not None)
        assert allocated < total
        assert allocated <= data + 64 * KiB, (allocated, data)
    else:
        check = qemu_img("check", "-f", "qcow2", str(image))
        assert check.returncode == 0, check.stdout
        nonzero = sum(e["length"] for e in qemu_map(image) if not e["zero"])
        assert nonzero < sum(n for _, n, name, _ in LAYOUT if name is not None)


def test_fill_with_nothing_to_write_writes_nothing(stored: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path, _ = stored
    target = RawTarget(tmp_path / "empty.raw", DISK)
    stats = fill(reopen(path), target, [Piece(0, 64 * KiB, None)], mask=False, workers=2)
    target.close()
    assert stats == FillStats(zero_bytes=64 * KiB)
    assert os.stat(tmp_path / "empty.raw").st_blocks == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("victim", ["raw-stored", "compressed"])
def test_damaged_pack_fails_fill_with_where_and_no_thread_left(tmp_path: Path, fmt: str, workers: int,
                                                               victim: str) -> None:
    repo = make_repo(tmp_path / "repo", fmt)
    blobs = {f"r{i}": rand(CH, 120 + i) for i in range(6)} | {"compressed": text(CH, 130)}
    ids = store(repo, blobs)
    name = "r3" if victim == "raw-stored" else "compressed"
    repo = reopen(tmp_path / "repo")
    loc = repo.locate(ids[name])
    if victim == "compressed":
        assert loc.length < CH // 2, "the text blob should be stored compressed"
    pack = tmp_path / "repo" / pack_name(loc.pack)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x40
    pack.write_bytes(raw)

    layout = [(i * CH, CH, n, 0) for i, n in enumerate(blobs)]
    threads = threading.active_count()
    target = RawTarget(tmp_path / "d.raw", len(blobs) * CH)
    try:
        with pytest.raises(IntegrityError) as err:
            fill(repo, target, pieces_of(ids, layout), mask=False, workers=workers, where="restore of disk vda")
    finally:
        target.close()
    assert str(err.value).startswith("restore of disk vda: "), str(err.value)
    assert ids[name].hex() in str(err.value) or loc.pack in str(err.value), str(err.value)
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]


# -- mask: an overlay's zeros hide its backing file (through qemu-nbd) ------------------------------------

def backed_overlay(tmp_path: Path, size: int, seed: int) -> tuple[bytes, Path]:
    """A base qcow2 full of random data (written through qemu-nbd) and an empty overlay on it: the
    overlay's path and the base's bytes."""
    base_data = rand(size, seed)
    base = tmp_path / "base.qcow2"
    create_qcow2(base, size, {})
    t = QemuNbdTarget(base, tmp_path, 1)
    t.writer().pwrite(base_data, 0)
    t.close()
    top = tmp_path / "top.qcow2"
    create_qcow2(top, size, {}, backing="base.qcow2")
    return base_data, top


@pytest.mark.parametrize("mask", [True, False])
def test_mask_hides_the_backing_file(stored: tuple[Path, dict[str, bytes]], tmp_path: Path, mask: bool) -> None:
    """Zero pieces and zero grains inside data become zero clusters of the overlay when ``mask``; without
    it (the control) the backing file shows through them."""
    path, ids = stored
    size = 4 * MiB
    base_data, top = backed_overlay(tmp_path, size, 140)
    layout = [
        (M, 256 * KiB, None, 0),  # a zero piece
        (2 * M, CH, "B", 0),  # zero grains on the grid
        (3 * M + 4096, CH, "B", 0),  # and off it
        (512 * KiB + 512, 5000, "A", 333),
        (3 * M + 512 * KiB, CH, "E", 0),  # all zeros
    ]
    target = QemuNbdTarget(top, tmp_path, 2)
    try:
        stats = fill(reopen(path), target, pieces_of(ids, layout), mask=mask, workers=2, where="overlay")
    finally:
        target.close()
    assert stats.zero_bytes == expected_bytes(layout)[1]
    got = read_image(top, tmp_path)
    want = model_of(size, layout, base_data, mask=mask)
    assert got == want
    if mask:  # the masked ranges are zero clusters of the overlay, not data
        entries = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
        at_top = [(e["start"], e["start"] + e["length"]) for e in entries if e["depth"] == 0 and e["zero"]]
        assert any(a <= M and M + 256 * KiB <= b for a, b in at_top), entries


def test_mask_with_zero_pieces_only(stored: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """An overlay that only zeroes (a discard-only incremental): no blob to read, the zeros still written."""
    path, _ = stored
    size = 2 * MiB
    base_data, top = backed_overlay(tmp_path, size, 150)
    layout = [(0, 64 * KiB, None, 0), (MiB + 512, 70000, None, 0)]
    target = QemuNbdTarget(top, tmp_path, 2)
    try:
        stats = fill(reopen(path), target, pieces_of({}, layout), mask=True, workers=2)
    finally:
        target.close()
    assert stats == FillStats(zero_bytes=64 * KiB + 70000)
    assert read_image(top, tmp_path) == model_of(size, layout, base_data)


def test_piece_longer_than_its_blob_never_writes_another_blobs_bytes(tmp_path: Path) -> None:
    """An inconsistent manifest (a piece claiming 8 KiB of a 4 KiB blob) fails (IntegrityError): the decode
    buffers are reused between blobs, so reading past a blob would write another blob's bytes."""
    repo = make_repo(tmp_path / "repo", "plain")
    blobs = {f"big{i}": rand(CH, 160 + i) for i in range(10)} | {f"small{i}": rand(4096, 180 + i) for i in range(10)}
    ids = store(repo, blobs)
    layout = [(i * CH, CH if n.startswith("big") else 8192, n, 0) for i, n in enumerate(blobs)]
    target = RawTarget(tmp_path / "d.raw", len(blobs) * CH)
    try:
        with pytest.raises(IntegrityError, match="manifest takes bytes 0..8192 of blob"):
            fill(reopen(tmp_path / "repo"), target, pieces_of(ids, layout), mask=False, workers=1)
    finally:
        target.close()
    image = (tmp_path / "d.raw").read_bytes()
    foreign = [n for i, n in enumerate(blobs)
               if n.startswith("small") and image[i * CH + 4096:i * CH + 8192] != bytes(4096)]
    assert not foreign, f"the tails of {foreign} hold bytes of other blobs"
