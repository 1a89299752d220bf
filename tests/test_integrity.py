"""A point holds the disks exactly as they were at the freeze, whatever the guest does in any window of
the run (DESIGN §6, FIELD-NOTES §5e).

The guest's hostile operations — WRITE_ZEROES, zero-filled writes on a ``detect-zeroes=unmap`` disk,
discards, ordinary writes — are made at exact moments through the run's events, on data that existed at
the freeze (and, for incrementals, was dirty, so the plan must decide about it):

* ``frozen``: point fixed, nothing exported — before the plan;
* ``exported``: exports up, no block status asked yet;
* ``planning``: the live status is read, the fleece target not yet — inside the plan;
* ``disk``: the disk is planned, none of it read yet;
* ``pull``: some of the disk's blobs read, the rest not (from the progress callback);
* ``pulled``: everything read, fleece still in place;
* ``flushing``: fleece torn down, the last packs and the index being uploaded;
* ``committing``: everything durable, the manifest about to be written.

Every point is compared byte for byte with the ground truth copied at the freeze; the next incremental
must then hold every change (and the image itself must agree with the ground truth model). Each window
runs in both formats: plaintext (1) and encrypted (2, the default).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

import pytest

from checks import assert_clean, assert_point_matches
from conftest import MiB
from fleece.exporter.backup import BackupRequest, run_backup
from fleece.repository import RepoConfig, Repository
from vm import TestVM, random_bytes, text_bytes

WINDOWS = ["frozen", "exported", "planning", "disk", "pull", "pulled", "flushing", "committing"]

# vda: plain qcow2 (discards unmap); vdb: Proxmox's default, zero-filled writes become WRITE_ZEROES.
NODE_OPTS = {"vda": "discard=unmap", "vdb": "detect-zeroes=unmap,discard=unmap"}
DISKS = {"vda": 24 * MiB, "vdb": 16 * MiB}

# The ranges the guest attacks: (disk, offset, length, operation). Each holds fresh data at the freeze.
ATTACKS = [
    ("vda", 1 * MiB, MiB, "write-zeroes"),
    ("vda", 5 * MiB, MiB, "discard"),
    ("vda", 9 * MiB + 65536, 3 * 65536, "write-zeroes"),  # inside a grid cell, not aligned to it
    ("vda", 13 * MiB, MiB, "data"),
    ("vda", 20 * MiB, 2 * MiB, "write-zeroes"),  # the last cells: read last in the pull
    ("vdb", 2 * MiB, MiB, "zero-data"),
    ("vdb", 6 * MiB, MiB, "write-zeroes"),
    ("vdb", 10 * MiB, 2 * 65536, "discard"),
    ("vdb", 14 * MiB, MiB, "zero-data"),
]


def attack(vm: TestVM, only: str | None = None, attacks: list[tuple[str, int, int, str]] = ATTACKS) -> None:
    for disk, off, length, op in attacks:
        if only and disk != only:
            continue
        if op == "write-zeroes":
            vm.zero(disk, off, length)
        elif op == "zero-data":
            vm.zero_data(disk, off, length)
        elif op == "discard":
            vm.discard(disk, off, length)
        else:
            vm.write(disk, off, b"\xdd" * length)


def refill(vm: TestVM, seed: int) -> None:
    """Fresh data in every attacked range (and so, after a first backup, dirty data)."""
    for i, (disk, off, length, _) in enumerate(ATTACKS):
        vm.write(disk, off, random_bytes(length, seed * 100 + i) if i % 2 else text_bytes(length, seed + i))


class Attacker:
    """The run's event hook: copies the ground truth at the freeze, attacks in one window."""

    def __init__(self, vm: TestVM, window: str, attacks: list[tuple[str, int, int, str]] = ATTACKS) -> None:
        self.vm = vm
        self.window = window
        self.attacks = attacks
        self.refs: dict[str, Path] = {}
        self.done = False
        self.done_before_pulled = False
        self.thread: threading.Thread | None = None
        self._attacked: set[str] = set()
        self._n = 0

    def _go(self) -> None:
        attack(self.vm, attacks=self.attacks)
        self.done = True

    def event(self, name: str, data: dict) -> None:
        if name == "pulled":
            self.done_before_pulled = self.done
        if name == "frozen":
            self._n += 1
            self.refs = self.vm.snapshot_refs(f"w{self.window}-{self._n}")
        if name == self.window and not self.done:
            if name in ("planning", "disk"):
                # Per disk: attack each disk in its own planning/read window.
                attack(self.vm, data["disk"], self.attacks)
                self._attacked.add(data["disk"])
                self.done = self._attacked >= {disk for disk, *_ in self.attacks}
            else:
                self._go()

    def progress(self, nbytes: int) -> None:
        # Called by the reader thread after its first blob was read, with the next job's reads in flight:
        # the guest acts while the reader waits, so the attack lands strictly inside the pull. FIELD-NOTES
        # §3 warns that an HMP write can stall on unconsumed NBD replies; it did not here (cbw +
        # snapshot-access, 1 MiB reads), and the wait is bounded so a stall would show as a failure below.
        if self.window == "pull" and not self.done and self.thread is None:
            self.thread = threading.Thread(target=self._go)
            self.thread.start()
            self.thread.join(30)


@pytest.fixture(scope="module")
def integrity_vm(tmp_path_factory: pytest.TempPathFactory):
    vm = TestVM(tmp_path_factory.mktemp("integrity"), DISKS, name="hostile", node_opts=NODE_OPTS)
    vm.start()
    yield vm
    vm.cleanup()


def _backup(vm: TestVM, repo: Repository, scratch: Path, hook: Attacker | None, **kw):
    events = hook.event if hook else None
    progress = hook.progress if hook else None
    result = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=events,
                                            progress=progress, workers=1, **kw))
    if hook and hook.thread is not None:
        hook.thread.join(60)
    return result


@pytest.mark.parametrize("fmt", [1, 2], ids=["plaintext", "encrypted"])
@pytest.mark.parametrize("level", ["full", "incremental"])
@pytest.mark.parametrize("window", WINDOWS)
def test_guest_attacks_in_every_window(integrity_vm: TestVM, tmp_path: Path, window: str, level: str, fmt: int,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Both formats: the encrypted one seals, ids blobs by HMAC and audits by those ids on the same path."""
    caplog.set_level(logging.INFO)
    vm = integrity_vm
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = RepoConfig(pack_target=MiB) if fmt == 1 else RepoConfig.encrypted(pack_target=MiB)
    repo = Repository.open(str(tmp_path / "repo"), create=True, config=config, kdf_time=0)  # password: conftest
    assert repo.encrypted == (fmt == 2)
    refill(vm, 1)
    first = _backup(vm, repo, scratch, None)
    refill(vm, 2)  # dirty data at the next freeze
    hook = Attacker(vm, window)
    result = _backup(vm, repo, scratch, hook, full=(level == "full"))
    assert hook.done, f"the guest never acted in window {window}"
    if window == "pull":
        assert hook.done_before_pulled, "the attack did not land during the pull"
    assert result.manifest.kind == level
    assert_point_matches(repo, result.manifest, hook.refs)
    assert_clean(vm.guest)
    if window in ("frozen", "exported"):
        # The live status saw the zeroed ranges as zero; only the fleece target check kept their data.
        assert "changed by the guest since the freeze are read from the frozen view" in caplog.text
    # The next incremental holds every change the guest made.
    after = Attacker(vm, "none")
    nxt = _backup(vm, repo, scratch, after)
    assert nxt.manifest.kind == "incremental" and nxt.manifest.parent == result.manifest.id
    assert_point_matches(repo, nxt.manifest, after.refs)
    assert first.manifest.id != result.manifest.id


def test_ground_truth_model_matches_the_image(integrity_vm: TestVM) -> None:
    """The reference files the tests compare with are what the disks really hold (discard, detect-zeroes)."""
    vm = integrity_vm
    refill(vm, 3)
    attack(vm)
    vm.quit()
    try:
        for disk in vm.disks.values():
            assert vm.read_disk_stopped(disk.id) == disk.reference.read_bytes(), disk.id
    finally:
        vm.start()


def _overlay_vm(make_vm, size: int, base_data: list[tuple[int, bytes]]) -> TestVM:
    """A VM whose vda is a thin qcow2 overlay over a backing file holding *base_data*."""
    vm = make_vm(disks={"vda": size}, start=False, node_opts={"vda": "discard=unmap"})
    d = vm.disks["vda"]
    base = vm.dir / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    chunk = vm.dir / "chunk.bin"
    for off, data in base_data:
        chunk.write_bytes(data)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {chunk} {off} {len(data)}", str(base)],
                       check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(d.image),
                    str(size)], check=True)
    with open(d.reference, "wb") as f:
        f.truncate(size)
        for off, data in base_data:
            f.seek(off)
            f.write(data)
    vm.start()
    return vm


def test_full_of_an_overlay_reads_only_what_the_chain_allocates(make_vm, tmp_path: Path) -> None:
    base_data = [(4 * MiB, random_bytes(4 * MiB, 90)), (40 * MiB, text_bytes(MiB, 91))]
    vm = _overlay_vm(make_vm, 64 * MiB, base_data)
    vm.write("vda", 20 * MiB, random_bytes(MiB, 92))  # in the overlay
    vm.zero("vda", 5 * MiB, MiB)  # masks backing data: zero in the overlay
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    # and the guest zeroes backing-file data right after the freeze
    hook = Attacker(vm, "frozen", [("vda", 40 * MiB, MiB, "write-zeroes"), ("vda", 6 * MiB, MiB, "discard")])
    full = _backup(vm, repo, scratch, hook)
    stats = full.manifest.disks["vda"].stats
    # 4 MiB + 1 MiB from the backing file, 1 MiB from the overlay, minus the 1 MiB the overlay zeroes
    assert stats["read_bytes"] == 5 * MiB, stats
    assert_point_matches(repo, full.manifest, hook.refs)
    # Incrementals of the overlay: dirty overlay data zeroed between freeze and plan, then inside the plan.
    vm.write("vda", 60 * MiB, b"\x61" * 65536)
    vm.write("vda", 20 * MiB, random_bytes(2 * MiB, 96))
    for window in ("frozen", "planning"):
        hook = Attacker(vm, window, [("vda", 20 * MiB, 2 * MiB, "write-zeroes")])
        inc = _backup(vm, repo, scratch, hook)
        assert inc.manifest.kind == "incremental"
        assert_point_matches(repo, inc.manifest, hook.refs)
        vm.write("vda", 20 * MiB, random_bytes(2 * MiB, 97))
    after = Attacker(vm, "none")
    inc = _backup(vm, repo, scratch, after)
    assert inc.manifest.kind == "incremental"
    assert_point_matches(repo, inc.manifest, after.refs)


def test_full_of_a_thin_1tib_overlay_reads_only_its_data(make_vm, tmp_path: Path) -> None:
    TiB = 1 << 40
    vm = _overlay_vm(make_vm, TiB, [(0, text_bytes(MiB, 93)), (TiB - MiB, random_bytes(MiB, 94))])
    vm.write("vda", 300 << 30, random_bytes(65536, 95))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    full = _backup(vm, repo, scratch, None)
    stats = full.manifest.disks["vda"].stats
    assert stats["read_bytes"] == 2 * MiB + 65536, stats
    extents = full.manifest.disks["vda"].extents
    # cells holding less than half data are stored as blobs of their runs (issue #13: a full costs what its
    # data costs), not as whole 4 MiB cells of mostly zeros
    assert [(o, n) for o, n, _ in extents] == [(0, MiB), (300 << 30, 65536), (TiB - MiB, MiB)]


@pytest.mark.parametrize("window", WINDOWS)
def test_guest_attacks_an_incremental_stored_merged(integrity_vm: TestVM, tmp_path: Path, window: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded-chain path (an incremental on a MAX_CHAIN-layer chain is stored as one merged layer,
    exporter/backup.py ``_bounded``) under the same attacks: the merge must take the point's own layer as
    it was frozen, ZERO entries included, and the next incremental builds on the merged layer."""
    from fleece.exporter import backup as backup_module

    monkeypatch.setattr(backup_module, "MAX_CHAIN", 1)  # every incremental is stored merged
    vm = integrity_vm
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    repo = Repository.open(str(tmp_path / "repo"), create=True, config=RepoConfig.encrypted(pack_target=MiB),
                           kdf_time=0)
    refill(vm, 3)
    _backup(vm, repo, scratch, None)
    refill(vm, 4)
    hook = Attacker(vm, window)
    result = _backup(vm, repo, scratch, hook)
    assert hook.done, f"the guest never acted in window {window}"
    for disk in result.manifest.disks.values():
        assert disk.kind == "full" and disk.stats["merged_from"], "stored merged"
        assert disk.stats["read_bytes"] == disk.stats["dirty_bytes"] < 8 * MiB  # only the changes were read
    assert_point_matches(repo, result.manifest, hook.refs)
    assert_clean(vm.guest)
    after = Attacker(vm, "none")
    nxt = _backup(vm, repo, scratch, after)
    assert nxt.manifest.disks["vda"].stats["merged_from"] == [result.manifest.id]
    assert_point_matches(repo, nxt.manifest, after.refs)
