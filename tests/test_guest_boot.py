"""A real guest (tests/guest.py: Debian's kernel, busybox, ext4 root on /dev/vda) boots from a backup.

* ``fleece serve --writable`` of a point in Ceph RGW: the guest boots from the bucket, reads its files
  (checked by hash) and writes (into nbdkit's cow overlay) — and the bucket is unchanged after.
* ``fleece live-restore`` from RGW while the guest keeps writing: the guest runs before anything is copied,
  the stream ends with a local image that stands alone, holds the backed-up files and the guest's writes,
  and passes ``e2fsck``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import guest
from checks import FLEECE, fleece, ok, qemu_img
from vm import TestVM


@pytest.fixture(scope="module")
def booted_point(tmp_path_factory: pytest.TempPathFactory, s3_bucket: str):
    """A full of a VM whose disk is the guest's root filesystem, in RGW."""
    guest.build()
    d = tmp_path_factory.mktemp("boot")
    seed = os.urandom(3 << 20)
    root = guest.make_rootfs(d / "root.qcow2", guest.MARKER_INIT, size_mib=48, files={"/data/seed": seed})
    size = json.loads(qemu_img("info", "--output=json", str(root)).stdout)["virtual-size"]
    vm = TestVM(d / "vm", {"vda": size}, name="bootvm", images={"vda": root}, truth=False)
    vm.start()
    try:
        scratch = d / "scratch"
        scratch.mkdir()
        repo = f"s3://{s3_bucket}/boot-{os.getpid()}"
        full = ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", repo, "--scratch", str(scratch), "--json"))
    finally:
        vm.quit()
    return {"repo": repo, "id": full["id"], "seed": hashlib.sha256(seed).hexdigest(), "dir": d}


def bucket_state(repo: str) -> dict[str, str]:
    import boto3

    bucket, prefix = repo[5:].split("/", 1)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_a_real_guest_boots_from_the_bucket_and_writes(booted_point, tmp_path) -> None:
    before = bucket_state(booted_point["repo"])
    sock = tmp_path / "boot.sock"
    serve = subprocess.Popen([FLEECE, "serve", "--repo", booted_point["repo"], "--vm", "bootvm", "--writable",
                              "--socket", str(sock), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc = json.loads(serve.stdout.readline() or "{}")
        assert doc.get("default") == f"nbd+unix:///?socket={sock}", serve.stderr.read() if serve.poll() else doc
        drive = ["-drive", f"file={doc['default']},format=raw,if=none,id=d0,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=d0,id=vda"]
        with guest.Guest(tmp_path / "g", drive, extra_append="fleece.churn=1") as g:
            g.wait_for("FLEECE-GUEST-UP", timeout=90)
            g.wait_for(f"FLEECE-SEED {booted_point['seed']}", timeout=60)  # read back through the plugin
            g.wait_for("FLEECE-GUEST-WROTE", timeout=60)  # written through the cow overlay
            g.wait_for("FLEECE-CHURN 10", timeout=60)  # and it keeps running and writing
            assert "FLEECE-BOOTS 1" in g.console()
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
    assert bucket_state(booted_point["repo"]) == before, "serving a writable disk changed the bucket"


def test_live_restore_from_the_bucket_while_the_guest_writes(booted_point, tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([FLEECE, "live-restore", "--repo", booted_point["repo"], "--vm", "bootvm", "--out",
                             str(out), "--json", "--speed", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready = json.loads(proc.stdout.readline() or "{}")
    assert ready.get("stage") == "ready", proc.stderr.read()
    args = [*ready["qemu_args"], "-device", ready["devices"]["vda"]]
    image = Path(ready["images"]["vda"])
    g = guest.Guest(tmp_path / "g", args, extra_append="fleece.churn=1", qmp=False)  # the QMP is live-restore's
    try:
        g.wait_for("FLEECE-GUEST-WROTE", timeout=90)  # running (and writing) before the copy is done
        running = proc.poll() is None
        assert proc.wait(300) == 0, proc.stderr.read()
        done = json.loads(proc.stdout.readline())
        assert done["stage"] == "done"
        assert running, "the stream finished before the guest had booted: nothing showed the VM ran early"
        g.wait_for("FLEECE-CHURN 10", timeout=60)  # still running, now on its own image alone
    finally:
        g.stop()  # SIGTERM: QEMU closes its images cleanly
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert "backing-filename" not in info, info
    raw = tmp_path / "final.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert hashlib.sha256(guest.read_file(raw, "/data/seed", fmt="raw")).hexdigest() == booted_point["seed"]
    assert guest.read_file(raw, "/data/boots", fmt="raw").decode().count("boot ") == 1  # the guest's write
    assert len(guest.read_file(raw, "/data/churn", fmt="raw")) >= 65536
