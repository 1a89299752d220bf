"""Disks on every bus QEMU offers: a stable id and a working fleece on each (real QEMU, end to end).

``query-block`` names the device that owns a disk's BlockBackend in two forms — the bare device id
(scsi-hd, ide-hd, nvme, nvme-ns) or a canonical QOM path (virtio-blk's ``…/virtio-backend``, usb-storage's
internal scsi-hd, any device without an id) — and ``-drive`` setups have auto-generated node names that
change with every QEMU start. Every disk must keep its id across a restart (or each backup after it is a
full), and the copy-before-write filter must really be in the write path of each (or writes made after
the freeze would leak into the point: the byte-for-byte checks catch that).
"""

from __future__ import annotations

from pathlib import Path

from checks import assert_clean
from conftest import MiB
from fleece.exporter import graph
from fleece.exporter.inventory import _unique_ids, disk_id, inspect, qom_path
from test_backup import backup, check, repo  # noqa: F401 - repo is a fixture
from vm import TestVM, random_bytes, text_bytes

G = 65536  # bitmap granularity (qcow2 cluster size)
SIZE = 8 * MiB
ODD = 8 * MiB + 4608  # the last granule is partial

# One disk per bus; drive-if-virtio/-ide disks carry the names QEMU gives their drives.
BUSES = {
    "vblk": "virtio-blk",
    "sda": "scsi",
    "sata0": "ide",
    "nvme0": "nvme",
    "ns1": "nvme-ns",
    "usb0": "usb",
    "virtio0": "drive-if-virtio",
    "ide0-hd0": "drive-if-ide",
    "drv0": "drive-if-none",
}


def all_buses_vm(make_vm) -> TestVM:
    return make_vm({d: ODD if d in ("nvme0", "virtio0") else SIZE for d in BUSES}, buses=BUSES)


def auto_nodes(vm: TestVM) -> dict[str, str]:
    return {b["device"]: b["inserted"]["node-name"] for b in vm.guest.cmd("query-block")
            if b.get("device") and b.get("inserted")}


def test_every_bus_full_incremental_and_after_restart(make_vm, repo, scratch) -> None:
    vm = all_buses_vm(make_vm)
    info = inspect(vm.guest)
    assert {d.id for d in info.disks} == set(BUSES)  # every disk by its device id or drive name
    assert not [d.id for d in info.disks if "#" in d.id]
    for i, d in enumerate(vm.disks.values()):  # first granule, a 4 MiB grid line, the very last bytes
        vm.write(d.id, 0, text_bytes(G, i))
        vm.write(d.id, 4 * MiB - 4096, random_bytes(8192, 100 + i))
        vm.write(d.id, d.size - 512, bytes([i + 1]) * 512)

    full, rec = backup(vm, repo, scratch)
    assert full.manifest.kind == "full" and set(full.manifest.disks) == set(BUSES)
    check(vm, repo, full, rec)

    for i, d in enumerate(vm.disks.values()):
        vm.write(d.id, 2 * MiB, random_bytes(G, 200 + i))

    def after_freeze() -> None:  # through the filter on every bus: CBW must keep the old data
        for i, d in enumerate(vm.disks.values()):
            vm.write(d.id, 0, b"\xaa" * 4096)  # clean since the full
            vm.write(d.id, 2 * MiB, b"\xbb" * G)  # dirty, not yet read

    inc, rec = backup(vm, repo, scratch, after_freeze=after_freeze)
    assert inc.manifest.kind == "incremental" and inc.manifest.parent == full.manifest.id
    assert {d: r.stats["dirty_bytes"] for d, r in inc.manifest.disks.items()} == {d: G for d in BUSES}
    check(vm, repo, inc, rec)  # none of the after-freeze writes is in the point

    nodes_before = auto_nodes(vm)
    vm.quit()  # clean shutdown: the persistent bitmaps go into the qcow2s
    vm.start()
    assert auto_nodes(vm) != nodes_before  # the #blockNNN names did change: ids must not follow them
    assert {d.id for d in inspect(vm.guest).disks} == set(BUSES)
    for i, d in enumerate(vm.disks.values()):
        vm.write(d.id, 6 * MiB, random_bytes(G, 300 + i))

    after, rec = backup(vm, repo, scratch)
    assert after.manifest.kind == "incremental" and after.manifest.parent == inc.manifest.id
    assert {d: r.kind for d, r in after.manifest.disks.items()} == {d: "incremental" for d in BUSES}
    # the writes after the last freeze (2 granules) and the one after the restart
    assert {d: r.stats["dirty_bytes"] for d, r in after.manifest.disks.items()} == {d: 3 * G for d in BUSES}
    check(vm, repo, after, rec)

    only, rec = backup(vm, repo, scratch, disks=["nvme0", "ide0-hd0"])  # --disk by those ids
    assert set(only.manifest.disks) == {"nvme0", "ide0-hd0"}
    check(vm, repo, only, rec)


def test_unwind_puts_every_bus_back_on_its_node(make_vm, scratch) -> None:
    """What a killed run leaves behind — a cbw filter in front of every disk — is undone by the next run."""
    vm = all_buses_vm(make_vm)
    mon = vm.monitor()
    try:
        before = {d.id: d.node for d in inspect(mon).disks}
        for d in inspect(mon).disks:
            f = graph.DiskFleece(d, graph.FleeceNames.for_disk(d.id),
                                 scratch / f"{graph.PREFIX}{graph.FleeceNames.for_disk(d.id).token}-x.qcow2")
            graph.create_scratch(f.scratch_file, d.virtual_size)
            graph.add_target(mon, f)
            graph.add_cbw(mon, f)
            graph.insert_cbw(mon, f)
        under_filter = inspect(mon).disks
        assert all(d.node.startswith(graph.PREFIX + "cbw-") for d in under_filter)
        for d in vm.disks.values():  # guest writes go through the filters
            vm.write(d.id, MiB, b"\x11" * 4096)
        removed = graph.unwind(mon)
        assert len([r for r in removed if r.startswith("filter on")]) == len(BUSES)
        assert {d.id: d.node for d in inspect(mon).disks} == before
        assert_clean(mon)
        assert not list(Path(scratch).glob(f"{graph.PREFIX}*"))
        for d in vm.disks.values():
            vm.write(d.id, MiB, b"\x12" * 4096)  # and straight to the disk again
    finally:
        mon.close()


def test_disk_ids_prefer_stable_names() -> None:
    """Device id > drive name > user node name > anonymous device's QOM path > auto node name."""
    assert disk_id("/machine/peripheral/vda/virtio-backend", "#block1", "drive0") == "vda"
    assert disk_id("sda", "#block2") == "sda"
    assert disk_id("/machine/peripheral/usb0/usb0.0/legacy[0]", "n") == "usb0"
    assert disk_id("/machine/peripheral-anon/device[2]/virtio-backend", "#block3", "virtio0") == "virtio0"
    assert disk_id("/machine/unattached/device[16]", "#block4", "ide0-hd0") == "ide0-hd0"
    assert disk_id("/machine/peripheral-anon/device[0]", "disk0", "") == "disk0"
    assert disk_id("/machine/peripheral-anon/device[1]", "#block5", "") == "peripheral-anon-device-1"
    assert disk_id("", "#block6", "") == "#block6"  # nothing stable at all: the node is all there is
    # a device id beats another disk's equal drive name; the drive's id gets a stable prefix
    assert _unique_ids([("/machine/peripheral-anon/device[0]/virtio-backend", "#block7", "vda"),
                        ("/machine/peripheral/vda/virtio-backend", "n", "")]) == ["drive-vda", "vda"]
    assert qom_path("nvme0") == "/machine/peripheral/nvme0"  # a bare id is ambiguous for qom-set
    assert qom_path("/machine/peripheral/vda/virtio-backend") == "/machine/peripheral/vda/virtio-backend"
