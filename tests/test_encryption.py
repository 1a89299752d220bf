"""Repository format 2 (encrypted) end to end, with real QEMU, qemu-img and Ceph RGW, through the CLI only.

What a user relies on, each check able to fail:

* nothing a VM wrote, nor its name, disk ids, UUID, image paths or host, is readable in any byte or object
  name of the repository — on a local disk and in an S3 bucket — while every point restores bit-exact
  (the same grep over a format 1 repository finds them: the grep itself can see plaintext);
* a wrong or missing key fails before any work (no image, no object, QEMU untouched), tampering with a
  pack payload, a manifest or an index object is an "integrity" error naming the object;
* key slots rotate (add, remove, passwd) without re-encrypting data, the last full slot stays, a
  write-only key backs up (incrementals with dedup) but can read nothing back, a paper key recovers;
* format 1 keeps working and ignores passwords; a format 1 config planted over an encrypted repository
  (a downgrade to make backups store plaintext) is refused;
* FLEECE_PASSWORD_FILE / FLEECE_PASSWORD_COMMAND unlock, two password variables at once are a usage error.

The local encrypted world (one VM, one repository, a full and an incremental) is built once per module;
tests that change a repository work on a copy of it, tests that need backups of their own get their own VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks import FLEECE, assert_clean, env_with, fleece_bitmaps, identical, ok
from conftest import ODD_SIZE, TEST_PASSWORD, MiB, s3_url
from fleece.repository.crypto import OVERHEAD, PACK_HEADER_SIZE
from fleece.repository.pack import ENTRY_SIZE
from vm import TestVM, random_bytes, text_bytes

#: needles shorter than this are skipped: random ciphertext contains a 4-byte string with probability
#: ~2^-32 per position (a few in a thousand for a repository of a few MiB), a 2-byte one many times
MIN_NEEDLE = 5


# -- running fleece ------------------------------------------------------------------------------------------

def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed ``fleece`` with stdin on /dev/null: never a terminal, so never a password prompt."""
    return subprocess.run([FLEECE, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)






def failure(p: subprocess.CompletedProcess[str], kind: str, exit_code: int = 1) -> dict:
    """Check a ``--json`` run failed with error *kind*, *exit_code*, and exactly one ``fleece: error:``
    line on stderr (no traceback); returns the error document."""
    assert p.returncode == exit_code, f"exit {p.returncode}, wanted {exit_code}: {p.stdout} {p.stderr}"
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    err = json.loads(p.stdout)["error"]
    assert err["kind"] == kind, f"kind {err['kind']!r}, wanted {kind!r}: {err['message']}"
    assert "\n" not in err["message"]
    return err


def assert_no_image(out: Path) -> None:
    """A failed restore leaves --out absent or empty: no image, no partial file."""
    assert not out.exists() or not any(out.iterdir()), sorted(str(p) for p in out.rglob("*"))


# -- repository contents -------------------------------------------------------------------------------------

def local_objects(root: Path) -> dict[str, bytes]:
    """Every file of a local repository (all bytes), by its name relative to the root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def s3_objects(rgw: dict, url: str) -> dict[str, bytes]:
    """Every object under a repository's prefix in the bucket, listed and read with boto3 directly."""
    import boto3

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=rgw["endpoint"], aws_access_key_id=rgw["access_key"],
                          aws_secret_access_key=rgw["secret_key"], region_name=rgw.get("region") or "us-east-1")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def find_needles(objects: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    """Every (needle, object) where the needle appears in the object's name or anywhere in its bytes."""
    return [f"{label} in {name}" for name, data in objects.items() for label, needle in needles.items()
            if needle in data or needle in name.encode()]


def state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file: to show that a failed command stored, changed or removed nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# -- a VM with distinctive names, data and history -----------------------------------------------------------

@dataclass
class World:
    """A VM backed up into one repository: a full then an incremental, with the truth of each."""

    vm: TestVM
    url: str
    disks: tuple[str, str]
    ids: list[str]
    refs: list[dict[str, Path]]
    needles: dict[str, bytes]  # label → bytes that must not appear in an encrypted repository
    scratch: Path

    @property
    def root(self) -> Path:
        return Path(self.url)


def distinctive_vm(workdir: Path, token: str) -> TestVM:
    """A VM whose name, disk ids and UUID are unique strings (findable if they leak)."""
    disks = (f"quokkadisk-{token}", f"narwhaldisk-{token}")
    vm = TestVM(workdir, {disks[0]: 32 * MiB, disks[1]: ODD_SIZE}, name=f"ledger-vm-{token}-prod")
    vm.uuid = str(uuid.uuid4())
    return vm


@contextlib.contextmanager
def running_vm(workdir: Path) -> Iterator[tuple[TestVM, Path, str]]:
    """A started :func:`distinctive_vm`, its scratch directory and its token; cleaned up afterwards."""
    token = secrets.token_hex(4)
    vm = distinctive_vm(workdir / "vm", token)
    vm.start()
    try:
        scratch = workdir / "scratch"
        scratch.mkdir()
        yield vm, scratch, token
    finally:
        vm.cleanup()


def stamped_random(n: int, seed: int, marker: bytes) -> bytes:
    """Incompressible data with *marker* at every 4 KiB: stored raw or as zstd literals, so plaintext
    storage would show the marker verbatim."""
    data = bytearray(random_bytes(n, seed))
    for off in range(0, n - len(marker), 4096):
        data[off:off + len(marker)] = marker
    return bytes(data)


def repeated(n: int, marker: bytes) -> bytes:
    """Compressible data: *marker* repeated."""
    return (marker * (n // len(marker) + 1))[:n]


def populate(vm: TestVM, url: str, scratch: Path, token: str, env: dict[str, str] | None = None) -> World:
    """Guest writes with plaintext markers, a full backup, more writes, an incremental (CLI, --json)."""
    a, b = list(vm.disks)
    markers = {f"marker {kind} {step}": f"FLEECE-PLAINTEXT-{token}-{kind}-{step}|".encode()
               for kind in ("compressible", "random") for step in ("full", "inc")}
    needles: dict[str, bytes] = dict(markers)
    needles.update({"vm name": vm.name.encode(), f"disk id {a}": a.encode(), f"disk id {b}": b.encode(),
                    "vm uuid": str(vm.uuid).encode(), "vm dir": str(vm.dir).encode()})
    needles.update({f"image {d}": str(vm.disks[d].image).encode() for d in vm.disks})
    host = socket.gethostname()
    if len(host) >= MIN_NEEDLE:
        needles["hostname"] = host.encode()
    else:
        warnings.warn(f"hostname {host!r} is not searched for: shorter than {MIN_NEEDLE} bytes, it would be found "
                      "in random ciphertext by chance (the VM's UUID and image paths, also in the manifest's "
                      "machine record, are searched instead)")
    # full: 64 KiB of each kind on each disk, at the start, mid-disk and at the end of the odd-sized disk
    vm.write(a, 0, repeated(65536, markers["marker compressible full"]))
    vm.write(a, 9 * MiB, stamped_random(65536, 1, markers["marker random full"]))
    vm.write(b, MiB, repeated(65536, markers["marker compressible full"]))
    vm.write(b, ODD_SIZE - 65536 - 4608, stamped_random(65536, 2, markers["marker random full"]))
    vm.write(a, 20 * MiB, text_bytes(2 * MiB, 3))
    ids, refs = [], []
    for step in ("full", "inc"):
        if step == "inc":
            vm.write(a, 9 * MiB + 32768, repeated(65536, markers["marker compressible inc"]))  # over older data
            vm.write(a, 30 * MiB, stamped_random(65536, 4, markers["marker random inc"]))
            vm.write(b, 12 * MiB, stamped_random(131072, 5, markers["marker random inc"]))
            vm.zero(a, 20 * MiB, MiB)
        refs.append(vm.snapshot_refs(f"{token}-{step}"))  # no guest writes while the backup runs
        doc = ok(run("backup", "--qmp", vm.qmp_path, "--repo", url, "--scratch", str(scratch), "--json", env=env))
        assert doc["kind"] == ("full" if step == "full" else "incremental") and doc["vm"] == vm.name
        ids.append(doc["id"])
    return World(vm, url, (a, b), ids, refs, needles, scratch)


def check_restores(w: World, tmp: Path, env: dict[str, str] | None = None) -> None:
    """The incremental as a qcow2 chain and the full as flat qcow2 images: bit-exact to the truth."""
    out = tmp / f"chain-{secrets.token_hex(3)}"
    doc = ok(run("restore", "--repo", w.url, "--vm", w.vm.name, "--point", w.ids[1], "--out", str(out), "--json",
                 env=env))
    assert doc["point"] == w.ids[1]
    for d in w.disks:
        identical(out / f"{d}.qcow2", w.refs[1][d])
    flat = tmp / f"flat-{secrets.token_hex(3)}"
    ok(run("restore", "--repo", w.url, "--vm", w.vm.name, "--point", w.ids[0], "--out", str(flat), "--flat",
           "--json", env=env))
    for d in w.disks:
        identical(flat / f"{d}.qcow2", w.refs[0][d])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The local encrypted repository (made by ``fleece init``) of a VM, shared read-only by the module."""
    work = tmp_path_factory.mktemp("enc")
    with running_vm(work) as (vm, scratch, token):
        url = str(work / "repo")
        doc = ok(run("init", "--repo", url, "--json"))
        assert doc["format"] == 2 and doc["encrypted"] is True and doc["key_slot"]
        yield populate(vm, url, scratch, token)


@pytest.fixture
def copy(world: World, tmp_path: Path) -> Path:
    """A private copy of the module's repository, for tests that change or damage it."""
    dst = tmp_path / "repo-copy"
    shutil.copytree(world.root, dst)
    return dst


# -- 1, 2: nothing readable, everything restorable -----------------------------------------------------------

def test_local_repository_holds_no_plaintext_and_restores(world: World, tmp_path: Path) -> None:
    objects = local_objects(world.root)
    prefixes = {name.split("/")[0] for name in objects}
    assert {"config", "keys", "data", "index", "points"} <= prefixes, prefixes
    assert sum(len(v) for k, v in objects.items() if k.startswith("data/")) > 320 << 10  # the 320 KiB of random data
    assert json.loads(objects["config"])["format"] == 2
    assert not find_needles(objects, world.needles)

    listing = ok(run("list", "--repo", world.url, "--json"))
    assert [(p["vm"], p["id"], p["kind"]) for p in listing["points"]] == [
        (world.vm.name, world.ids[0], "full"), (world.vm.name, world.ids[1], "incremental")]
    assert set(listing["points"][1]["disks"]) == set(world.disks)
    check_restores(world, tmp_path)


@pytest.mark.s3
def test_s3_bucket_holds_no_plaintext_and_restores(s3_bucket: str, rgw: dict, tmp_path: Path) -> None:
    with running_vm(tmp_path) as (vm, scratch, token):
        url = s3_url(s3_bucket)
        w = populate(vm, url, scratch, token)  # no init: the first backup creates the repository, encrypted
        objects = s3_objects(rgw, url)
        assert json.loads(objects["config"])["format"] == 2
        assert any(k.startswith("keys/") for k in objects) and any(k.startswith("data/") for k in objects)
        assert not find_needles(objects, w.needles)
        check_restores(w, tmp_path)


# -- 3: wrong keys fail before any work, tampering is an integrity error ------------------------------------

def test_wrong_or_missing_key_fails_before_any_work(world: World, tmp_path: Path) -> None:
    before = state(world.root)
    bitmaps = fleece_bitmaps(world.vm.guest)
    keyfile = tmp_path / "not-the-key"
    keyfile.write_bytes(os.urandom(64))
    cases = {"wrong password": env_with("not the password"), "no credential": env_with(None),
             "wrong key file": env_with(None, FLEECE_KEY_FILE=str(keyfile))}
    for what, env in cases.items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        err = failure(run("restore", "--repo", world.url, "--vm", world.vm.name, "--out", str(out), "--json",
                          env=env), "key")
        if what == "no credential":
            assert "FLEECE_PASSWORD" in err["message"]
        assert_no_image(out)
        failure(run("list", "--repo", world.url, "--json", env=env), "key")
        failure(run("backup", "--qmp", world.vm.qmp_path, "--repo", world.url, "--scratch", str(world.scratch),
                    "--json", env=env), "key")
        assert state(world.root) == before, what  # nothing stored, nothing changed
        assert fleece_bitmaps(world.vm.guest) == bitmaps, what
        assert_clean(world.vm.guest)
        assert not list(world.scratch.iterdir())


def _blob_location(url: str, vm: str, point: str, disk: str) -> tuple[str, int, int]:
    """(pack id, offset, length) of a blob the restore of *point* reads (test-side lookup only)."""
    from fleece.repository import Repository

    with Repository.open(url) as repo:
        m = repo.manifest(vm, point)
        blob = next(p.blob for p in repo.resolve(m, disk) if p.blob is not None)
        loc = repo.locate(blob)
        return loc.pack, loc.offset, loc.length


@pytest.mark.parametrize("target", ["pack payload", "manifest", "index"])
def test_tampered_object_is_an_integrity_error(world: World, copy: Path, tmp_path: Path, target: str) -> None:
    if target == "pack payload":
        pack, offset, length = _blob_location(str(copy), world.vm.name, world.ids[1], world.disks[0])
        path = copy / "data" / pack[:2] / pack
        size = path.stat().st_size
        count = int.from_bytes(path.read_bytes()[-12:-8], "little")  # format 2 footer: N:u32 "FLCPACK2"
        payload_end = size - (PACK_HEADER_SIZE + count * ENTRY_SIZE + OVERHEAD + 12)  # header, sealed table, footer
        assert offset + length <= payload_end
        flip(path, offset + length // 2)
        named = f"data/{pack[:2]}/{pack}"
    elif target == "manifest":
        (token_dir,) = (copy / "points").iterdir()
        path = token_dir / world.ids[1]
        flip(path, path.stat().st_size // 2)
        named = f"points/{token_dir.name}/{world.ids[1]}"
    else:
        path = sorted((copy / "index").iterdir())[0]
        flip(path, path.stat().st_size // 2)
        named = f"index/{path.name}"
    for extra in ([], ["--flat"]):
        out = tmp_path / f"out{len(extra)}"
        err = failure(run("restore", "--repo", str(copy), "--vm", world.vm.name, "--point", world.ids[1],
                          "--out", str(out), "--json", *extra), "integrity")
        assert named in err["message"], err
        assert_no_image(out)
    if target == "pack payload":
        v = run("verify", "--repo", str(copy), "--read-data", "--json")
        assert v.returncode == 1 and not json.loads(v.stdout)["ok"] and pack in v.stdout, v.stdout + v.stderr


# -- 4: key rotation -----------------------------------------------------------------------------------------

def slots(url: str, env: dict[str, str]) -> list[dict]:
    return ok(run("key", "list", "--repo", url, "--json", env=env))["slots"]


def test_key_rotation(world: World, copy: Path, tmp_path: Path) -> None:
    url = str(copy)
    old = env_with(TEST_PASSWORD)
    (first,) = slots(url, old)
    assert first["current"] and first["access"] == "full" and first["kind"] == "passphrase"

    added = ok(run("key", "add", "--repo", url, "--label", "rotated", "--json",
                   env=env_with(TEST_PASSWORD, FLEECE_NEW_PASSWORD="second password")))["slot"]
    assert added["access"] == "full" and added["label"] == "rotated"
    second = env_with("second password")
    assert {s["id"] for s in slots(url, second)} == {first["id"], added["id"]}
    assert [s["id"] for s in slots(url, second) if s["current"]] == [added["id"]]
    assert ok(run("key", "remove", "--repo", url, first["id"], "--json", env=second))["removed"] == first["id"]
    failure(run("list", "--repo", url, "--json", env=old), "key")
    assert [p["id"] for p in ok(run("list", "--repo", url, "--json", env=second))["points"]] == world.ids

    # passwd: a new slot with the same access and label replaces the one that unlocked
    doc = ok(run("key", "passwd", "--repo", url, "--json", env=env_with("second password",
                                                                         FLEECE_NEW_PASSWORD="third password")))
    assert doc["removed"] == added["id"]
    third = env_with("third password")
    (now,) = slots(url, third)
    assert now["id"] == doc["slot"]["id"] and now["access"] == "full" and now["label"] == "rotated"
    failure(run("list", "--repo", url, "--json", env=second), "key")

    # the last full slot stays (refused as the last one, or as the slot this command was unlocked with:
    # from the CLI, the only full slot is always the one unlocking)
    err = failure(run("key", "remove", "--repo", url, now["id"], "--json", env=third), "usage", 2)
    assert now["id"] in err["message"] and ("last full" in err["message"] or "unlocked with" in err["message"])
    assert [s["id"] for s in slots(url, third)] == [now["id"]]
    # no data was re-encrypted: every point restores with the newest password
    check_restores(World(world.vm, url, world.disks, world.ids, world.refs, {}, world.scratch), tmp_path, third)


# -- 5: a write-only key -------------------------------------------------------------------------------------

def test_write_only_key_backs_up_but_reads_nothing(make_vm, tmp_path: Path, scratch: Path) -> None:
    vm = make_vm({"vda": 32 * MiB, "vdb": ODD_SIZE})
    url = str(tmp_path / "repo")
    cell = text_bytes(4 * MiB, 7)
    vm.write("vda", 4 * MiB, cell)  # one whole 4 MiB grid cell: the full stores it as one blob
    vm.write("vdb", 0, random_bytes(MiB, 8))
    full = ok(run("backup", "--qmp", vm.qmp_path, "--repo", url, "--scratch", str(scratch), "--json"))

    doc = ok(run("key", "add", "--repo", url, "--write-only", "--label", "hypervisor", "--json",
                 env=env_with(TEST_PASSWORD, FLEECE_NEW_PASSWORD="write only password")))
    assert doc["slot"]["access"] == "write-only"
    wo = env_with("write only password")
    assert {s["access"] for s in slots(url, wo)} == {"full", "write-only"}

    vm.write("vda", 12 * MiB, cell)  # the same content again, in another cell: deduplicated by keyed id
    vm.write("vda", 20 * MiB, random_bytes(65536, 9))  # the only new data
    refs = vm.snapshot_refs("wo")
    inc = ok(run("backup", "--qmp", vm.qmp_path, "--repo", url, "--scratch", str(scratch), "--json", env=wo))
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert inc["disks"]["vda"]["dirty_bytes"] == 4 * MiB + 65536 and inc["disks"]["vdb"]["dirty_bytes"] == 0
    assert inc["dedup_blobs"] == 1 and inc["new_blobs"] == 1, inc
    assert inc["uploaded_bytes"] < 65536 + 16384, inc  # one sealed 64 KiB pack + index, not the 4 MiB cell
    listing = ok(run("list", "--repo", url, "--json", env=wo))
    assert [(p["vm"], p["id"]) for p in listing["points"]] == [("testvm", full["id"]), ("testvm", inc["id"])]

    for extra in ([], ["--flat"]):
        out = tmp_path / f"wo-out{len(extra)}"
        failure(run("restore", "--repo", url, "--vm", "testvm", "--out", str(out), "--json", *extra, env=wo),
                "key-access")
        assert_no_image(out)
    failure(run("verify", "--repo", url, "--read-data", "--json", env=wo), "key-access")
    assert ok(run("verify", "--repo", url, "--json", env=wo))["ok"]
    failure(run("key", "export", "--paper", "--repo", url, "--json", env=wo), "key-access")
    full_slot = next(s["id"] for s in slots(url, wo) if s["access"] == "full")
    failure(run("key", "remove", "--repo", url, full_slot, "--json", env=wo), "key-access")
    failure(run("key", "add", "--repo", url, "--json", env=env_with("write only password",
                                                                     FLEECE_NEW_PASSWORD="escalated")), "key-access")
    assert len(slots(url, wo)) == 2

    out = tmp_path / "full-key"
    ok(run("restore", "--repo", url, "--vm", "testvm", "--point", inc["id"], "--out", str(out), "--json"))
    for d in ("vda", "vdb"):
        identical(out / f"{d}.qcow2", refs[d])
    v = ok(run("verify", "--repo", url, "--read-data", "--json"))
    assert v["ok"] and v["blobs_checked"] >= 3


# -- 6: paper key --------------------------------------------------------------------------------------------

def test_paper_key_recovers_a_repository(world: World, copy: Path, tmp_path: Path) -> None:
    url = str(copy)
    paper = ok(run("key", "export", "--paper", "--repo", url, "--json"))["paper_key"]
    groups = paper.split()
    assert len(groups) == 9 and all(len(g) == 8 for g in groups)
    # every password is lost: only the paper key
    paper_file = tmp_path / "paper.txt"
    typo = groups[0][:-1] + ("0" if groups[0][-1] != "0" else "1")
    paper_file.write_text(" ".join([typo, *groups[1:]]) + "\n")
    failure(run("key", "add", "--repo", url, "--paper-key-file", str(paper_file), "--json",
                env=env_with(None, FLEECE_NEW_PASSWORD="recovered")), "usage", 2)
    paper_file.write_text(paper + "\n")
    doc = ok(run("key", "add", "--repo", url, "--paper-key-file", str(paper_file), "--label", "recovery", "--json",
                 env=env_with(None, FLEECE_NEW_PASSWORD="recovered")))
    assert doc["slot"]["access"] == "full"
    recovered = env_with("recovered")
    assert len(slots(url, recovered)) == 2
    check_restores(World(world.vm, url, world.disks, world.ids, world.refs, {}, world.scratch), tmp_path, recovered)


# -- 7, 8: format 1, and a downgrade attempt -----------------------------------------------------------------

def test_format1_still_works_and_ignores_passwords(tmp_path: Path) -> None:
    with running_vm(tmp_path) as (vm, scratch, token):
        url = str(tmp_path / "plain")
        doc = ok(run("init", "--repo", url, "--no-encryption", "--json"))
        assert doc["format"] == 1 and doc["encrypted"] is False and doc["key_slot"] is None
        w = populate(vm, url, scratch, token, env=env_with("a password format 1 never asks for"))
        config = json.loads((Path(url) / "config").read_text())
        assert config["format"] == 1 and config["encryption"] == {"mode": "none"}
        assert not (Path(url) / "keys").exists()
        assert sorted(p.name for p in (Path(url) / "points" / vm.name).iterdir()) == w.ids
        # the grep the encrypted tests rely on does see plaintext: here the names and markers are found
        found = find_needles(local_objects(Path(url)), w.needles)
        for label in ("vm name", f"disk id {w.disks[0]}", f"disk id {w.disks[1]}", "vm uuid",
                      "marker random full", "marker random inc"):
            assert any(f.startswith(f"{label} in ") for f in found), (label, found)
        for env in (env_with(None), env_with("wrong"), env_with(None, FLEECE_PASSWORD_COMMAND="false")):
            assert [p["id"] for p in ok(run("list", "--repo", url, "--json", env=env))["points"]] == w.ids
        check_restores(w, tmp_path, env_with(None))
        failure(run("key", "list", "--repo", url, "--json"), "usage", 2)


def test_format1_config_over_an_encrypted_repository_is_refused(world: World, copy: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    ok(run("init", "--repo", str(plain), "--no-encryption", "--json"))
    shutil.copyfile(plain / "config", copy / "config")
    before = state(copy)
    bitmaps = fleece_bitmaps(world.vm.guest)
    for env in (env_with(TEST_PASSWORD), env_with(None)):
        for args in (["list"], ["verify"], ["key", "list"],
                     ["restore", "--vm", world.vm.name, "--out", str(tmp_path / "out")]):
            err = failure(run(*args, "--repo", str(copy), "--json", env=env), "integrity")
            assert "keys/" in err["message"] and err.get("object") == "config"
        failure(run("backup", "--qmp", world.vm.qmp_path, "--repo", str(copy), "--scratch", str(world.scratch),
                    "--json", env=env), "integrity")
    assert_no_image(tmp_path / "out")
    assert state(copy) == before  # the backup stored nothing, plaintext or not
    assert fleece_bitmaps(world.vm.guest) == bitmaps
    assert_clean(world.vm.guest)


def test_format1_config_and_keys_deleted_never_leads_to_plaintext(make_vm, world: World, copy: Path,
                                                                   tmp_path: Path, scratch: Path) -> None:
    """The same downgrade by someone who also deletes ``keys/``: the packs, index objects and manifests
    are still format 2, so the repository must still refuse plaintext — also when the user follows the
    advice fleece prints ("fleece rebuild-index") and backs up again."""
    plain = tmp_path / "plain"
    ok(run("init", "--repo", str(plain), "--no-encryption", "--json"))
    shutil.copyfile(plain / "config", copy / "config")
    shutil.rmtree(copy / "keys")
    sealed = {k: v for k, v in state(copy).items() if k != "config"}
    vm = make_vm({"vda": 8 * MiB})
    marker = f"FLEECE-PLAINTEXT-after-downgrade-{secrets.token_hex(4)}|".encode()
    vm.write("vda", 0, stamped_random(65536, 11, marker))
    backup = ["backup", "--qmp", vm.qmp_path, "--repo", str(copy), "--scratch", str(scratch), "--json"]
    failure(run(*backup), "integrity")
    rebuild = run("rebuild-index", "--repo", str(copy), "--json")
    assert rebuild.returncode != 0, rebuild.stdout
    again = run(*backup)
    leaked = [name for name, data in local_objects(copy).items() if marker in data or b"testvm" in name.encode()]
    after = state(copy)
    gone = sorted(k for k in sealed if after.get(k) != sealed[k])
    assert not gone and not leaked and again.returncode != 0, (
        f"format 2 objects deleted or changed: {gone}; plaintext stored: {leaked}; second backup exit "
        f"{again.returncode}; rebuild-index said {rebuild.stdout[:400]}")
    assert_clean(vm.guest)


# -- 9: where the password comes from ------------------------------------------------------------------------

def test_password_file_and_command(world: World, tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text(TEST_PASSWORD + "\n")  # one trailing newline is not part of the password
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")

    def points(env: dict[str, str], *extra: str) -> list[str]:
        return [p["id"] for p in ok(run("list", "--repo", world.url, "--json", *extra, env=env))["points"]]

    assert points(env_with(None, FLEECE_PASSWORD_FILE=str(pwfile))) == world.ids
    assert points(env_with(None, FLEECE_PASSWORD_COMMAND=f"cat {pwfile}")) == world.ids
    assert points(env_with(None), "--password-file", str(pwfile)) == world.ids
    failure(run("list", "--repo", world.url, "--json", env=env_with(None, FLEECE_PASSWORD_FILE=str(wrong))), "key")
    failure(run("list", "--repo", world.url, "--json", env=env_with(None, FLEECE_PASSWORD_COMMAND=f"cat {wrong}")),
            "key")
    for env in (env_with(None, FLEECE_PASSWORD_FILE=str(pwfile), FLEECE_PASSWORD_COMMAND=f"cat {pwfile}"),
                env_with(TEST_PASSWORD, FLEECE_PASSWORD_FILE=str(pwfile))):
        err = failure(run("list", "--repo", world.url, "--json", env=env), "usage", 2)
        assert "both set" in err["message"]
    # a failing command is a usage error that names the variable, not a wrong key
    err = failure(run("list", "--repo", world.url, "--json", env=env_with(None, FLEECE_PASSWORD_COMMAND="false")),
                  "usage", 2)
    assert "FLEECE_PASSWORD_COMMAND" in err["message"]
