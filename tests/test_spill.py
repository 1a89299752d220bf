"""Packs built in private files (repository/spill.py): the writer's memory no longer holds whole packs.

The bound is tested where it matters, in a writer run whose packs are big: before spilling, a writer with
three uploads held four buffers of the pack's size (4 × 64 MiB here); now its RSS must not depend on the
pack size at all. The spill's own contract — exact bytes at every offset, pieces, reset, privacy (no name
in the directory, mode 0600 whatever the umask) — is checked exactly.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleece.repository.spill import Spill, data_size, pieces


def test_a_spill_reads_back_what_was_appended_at_every_offset(tmp_path: Path) -> None:
    data = os.urandom(300_001)
    spill = Spill(tmp_path)
    for i in range(0, len(data), 70_000):
        spill.write(memoryview(data)[i:i + 70_000])
    assert len(spill) == data_size(spill) == len(data)
    assert bytes(spill) == data
    assert spill.read(123_456, 1000) == data[123_456:124_456]
    assert spill.read(len(data) - 10, 1000) == data[-10:]  # short at the end
    buf = memoryview(bytearray(65536))
    assert b"".join(bytes(p) for p in pieces(spill, buf)) == data
    assert b"".join(bytes(p) for p in pieces(spill, buf, 1000, 200_000)) == data[1000:200_000]
    assert [len(p) for p in pieces(data, buf, 0, 150_000)] == [65536, 65536, 150_000 - 131072]
    spill.reset()
    assert len(spill) == 0 and bytes(spill) == b""
    spill.write(b"again")
    assert bytes(spill) == b"again"
    spill.close()


def test_a_spill_has_no_name_and_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spill = Spill(tmp_path)
    finally:
        os.umask(old)
    spill.write(b"secret disk bytes")
    assert list(tmp_path.iterdir()) == []  # O_TMPFILE (or unlinked at once): nothing to open by name
    mode = os.fstat(spill._fd).st_mode
    assert stat.S_IMODE(mode) & 0o077 == 0, oct(mode)
    spill.close()


WRITER_RUN = textwrap.dedent("""
    import os, resource, sys
    from fleece.repository import RepoConfig, Repository
    from fleece.repository.credentials import Credential
    pack = int(sys.argv[2]) << 20
    config = RepoConfig.encrypted(chunk_size=4 << 20, pack_target=pack)
    repo = Repository.open(sys.argv[1], create=True, config=config, credential=Credential("passphrase", b"pw", "t"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    writer = repo.writer()
    blob = bytearray(os.urandom(4 << 20))
    for i in range(96):  # 384 MiB of incompressible blobs: six 64 MiB packs
        blob[:8] = i.to_bytes(8, "little")
        writer.add(bytes(blob))
    stats = writer.flush()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(stats.packs, (after - before) // 1024)
""")


def writer_growth(tmp_path: Path, pack_mib: int) -> tuple[int, int]:
    """(packs written, MiB the writer run added to the peak RSS) of one writer in a fresh process."""
    out = subprocess.run([sys.executable, "-c", WRITER_RUN, str(tmp_path / f"repo-{pack_mib}"), str(pack_mib)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize("uploads", [3])
def test_the_writers_memory_does_not_grow_with_the_pack_size(tmp_path: Path, uploads: int) -> None:
    packs_small, small = writer_growth(tmp_path, 8)
    packs_big, big = writer_growth(tmp_path, 64)
    assert packs_big < packs_small
    # with buffers of the pack's size, the 64 MiB run alone would add ≥ 3 × 64 MiB (a pack filling and
    # the ones uploading, touched whole); spilled, only blobs in flight and one staging buffer count
    assert big < 64, f"a writer with 64 MiB packs grew the RSS by {big} MiB (8 MiB packs: {small} MiB)"
    assert big - small < 16, (small, big)
