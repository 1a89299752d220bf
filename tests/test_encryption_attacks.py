"""Hostile tests of repository format 2 (issue #11: client-side encryption), through the CLI.

Three attackers, each with what they really hold:

* **bucket writer** — can list, read, write and delete objects, holds no key (a leaked S3 credential, a
  storage admin): may plant, copy, swap and delete objects, edit the plaintext ``config`` and recompute its
  unkeyed ``sha256``;
* **write-only key thief** — a hypervisor's write-only key file *and* its bucket credentials (what a
  hypervisor necessarily holds): the docs promise that this "exfiltrates nothing";
* **confused operator** — odd passwords, odd files behind the password variables, odd commands.

Each test either pins a defence that holds (so it keeps holding) or is the regression test of a bug found
by this attack session (its docstring says so, and it fails while the bug is there). Real QEMU for every
backup, local repositories in tmp dirs, scrypt at its floor (``FLEECE_KDF_TIME=0``, set by conftest).
Attacker code is written from docs/FORMAT.md with ``cryptography``'s primitives, not with fleece's
private helpers, so a refactoring of fleece cannot make an attack silently stop being an attack.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from checks import FLEECE, assert_clean, env_with, ok
from conftest import TEST_PASSWORD, MiB
from fleece.repository.crypto import Keys
from fleece.repository.pack import SealedPacks
from vm import TestVM, random_bytes

FIRST = "00000000"  #: a planted slot id that every listing returns before the genuine slot (tried first)


# -- running fleece ---------------------------------------------------------------------------------------

def limit_memory(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` capping the child's address space: an attack that makes fleece allocate without
    bound fails fast inside the cap instead of pushing a shared test machine (or a hypervisor) into OOM."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run(*args: str, env: dict[str, str | bytes] | None = None, timeout: float = 120,
        memory: int | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``fleece``, stdin on /dev/null (never a prompt), optionally inside a memory cap."""
    return subprocess.run([FLEECE, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, preexec_fn=limit_memory(memory) if memory else None)






def error(p: subprocess.CompletedProcess[str]) -> dict:
    """The error document of a failed ``--json`` run: one ``fleece: error:`` line, no traceback."""
    assert p.returncode != 0, p.stdout[-800:]
    assert "Traceback" not in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]) == 1, p.stderr
    return json.loads(p.stdout)["error"]


def failure(p: subprocess.CompletedProcess[str], kind: str, exit_code: int = 1) -> dict:
    err = error(p)
    assert (p.returncode, err["kind"]) == (exit_code, kind), f"exit {p.returncode} {err}"
    return err


def init(path: Path, env: dict[str, str | bytes] | None = None, *extra: str) -> dict:
    return ok(run("init", "--repo", str(path), "--json", *extra, env=env))


def points(url: Path, env: dict[str, str | bytes] | None = None) -> list[str]:
    return [p["id"] for p in ok(run("list", "--repo", str(url), "--json", env=env))["points"]]


# -- the format, from docs/FORMAT.md (what an attacker computes) -----------------------------------------

def hkdf(secret: bytes, info: str, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info.encode()).derive(secret)


def slot_ad(slot: dict) -> bytes:
    return f"fleece key slot {slot['repo']} {slot['id']} {slot['kind']} {slot['access']}".encode()


def slot_kek(slot: dict, secret: bytes) -> bytes:
    kdf = slot["kdf"]
    salt = base64.b64decode(kdf["salt"])
    if kdf["name"] == "hkdf":
        return hkdf(secret, "fleece/v2/key-file", salt)
    return hashlib.scrypt(secret, salt=salt, n=kdf["n"], r=kdf["r"], p=kdf["p"],
                          maxmem=256 * kdf["n"] * kdf["r"] + (64 << 20), dklen=32)


def unwrap(slot: dict, secret: bytes) -> bytes:
    sealed = base64.b64decode(slot["wrapped"])
    return AESGCM(slot_kek(slot, secret)).decrypt(sealed[:12], sealed[12:], slot_ad(slot))


def make_slot(repo_id: str, secret: bytes, material: bytes, *, slot_id: str = FIRST, kind: str = "passphrase",
              access: str = "full") -> dict:
    """A key slot as fleece writes one (passphrase: scrypt at its floor), wrapping any *material*."""
    kdf: dict = ({"name": "scrypt", "n": 1 << 14, "r": 8, "p": 1} if kind == "passphrase" else {"name": "hkdf"})
    kdf["salt"] = base64.b64encode(os.urandom(16)).decode()
    slot = {"id": slot_id, "kind": kind, "access": access, "repo": repo_id, "kdf": kdf, "wrapped": "",
            "created": "2026-12-01T00:00:00Z", "label": ""}
    nonce = os.urandom(12)
    slot["wrapped"] = base64.b64encode(nonce + AESGCM(slot_kek(slot, secret)).encrypt(nonce, material,
                                                                                       slot_ad(slot))).decode()
    return slot


def plant(repo: Path, name: str, data: bytes | dict) -> Path:
    path = repo / "keys" / name
    path.write_bytes(data if isinstance(data, bytes) else (json.dumps(data, indent=1) + "\n").encode())
    return path


def config_doc(repo: Path) -> dict:
    return json.loads((repo / "config").read_text())


def write_config(repo: Path, fields: dict) -> None:
    """Write *fields* as the config with a freshly computed unkeyed ``sha256`` (anyone can)."""
    fields = {k: v for k, v in fields.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (repo / "config").write_text(json.dumps({**fields, "sha256": digest}, indent=1, sort_keys=True) + "\n")


def genuine_slot(repo: Path, access: str) -> dict:
    docs = [json.loads(p.read_text()) for p in sorted((repo / "keys").iterdir())]
    (slot,) = [d for d in docs if d["access"] == access]
    return slot


def files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


# -- one guest-less VM for every backup of the module ---------------------------------------------------

@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestVM]:
    """One small VM; each test backs it up into its own repository (bitmaps are per repository id)."""
    machine = TestVM(tmp_path_factory.mktemp("attack-vm"), {"vda": 8 * MiB}, name="attackvm")
    machine.start()
    try:
        machine.write("vda", 0, random_bytes(65536, 1))
        yield machine
    finally:
        machine.cleanup()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attack-scratch")


def backup(vm: TestVM, repo: Path, scratch: Path, env: dict[str, str | bytes] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return run("backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(scratch), "--json", env=env)


@pytest.fixture(scope="module")
def world(vm: TestVM, scratch: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An encrypted repository with a full and an incremental of the VM (copied by tests that damage it)."""
    repo = tmp_path_factory.mktemp("attack-world") / "repo"
    init(repo)
    full = ok(backup(vm, repo, scratch))
    vm.write("vda", 2 * MiB, random_bytes(65536, 2))
    inc = ok(backup(vm, repo, scratch))
    assert inc["kind"] == "incremental"
    return {"repo": repo, "ids": [full["id"], inc["id"]], "vm": vm.name}


@pytest.fixture
def copy(world: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(world["repo"], dst)
    return dst


# == bugs ==================================================================================================

def test_downgrade_with_keys_and_index_deleted_stores_no_plaintext(vm: TestVM, scratch: Path, tmp_path: Path
                                                                   ) -> None:
    """BUG: a bucket writer who replaces the config with a format 1 one (same id, fresh sha256) and deletes
    ``keys/`` *and* ``index/`` turns the next backup into plaintext: exit 0, the guest's data readable in the
    bucket, only a log warning. The repository still shows it was encrypted (sealed manifests under
    ``points/<token>/``, FLCPACK2 packs), so the downgrade is detectable and must be refused."""
    repo = tmp_path / "repo"
    init(repo)
    ok(backup(vm, repo, scratch))
    fields = {k: v for k, v in config_doc(repo).items() if k not in ("auth", "sha256")}
    write_config(repo, {**fields, "format": 1, "encryption": {"mode": "none"}})
    shutil.rmtree(repo / "keys")
    shutil.rmtree(repo / "index")
    marker = f"FLEECE-PLAINTEXT-{secrets.token_hex(4)}|".encode()
    vm.write("vda", MiB, (marker * (65536 // len(marker) + 1))[:65536])
    p = backup(vm, repo, scratch)
    leaked = [name for name, data in files(repo).items() if marker in data]
    assert not leaked and p.returncode != 0, (
        f"backup exit {p.returncode} after the downgrade stored the guest's data in plaintext in {leaked}; "
        f"stderr: {p.stderr[-600:]}")
    assert_clean(vm.guest)


def _open_pack_as(keys: Keys, repo: Path, name: str) -> list[bytes]:
    """Every payload of pack *name* that *keys* can open, decompressed (the attacker's reader)."""
    path = repo / name
    data = path.read_bytes()
    layout = SealedPacks(keys)
    try:
        entries, header = layout.verify(path.name, data, len(data), name)
        sealer = keys.pack_key(header, name)
    except Exception:  # noqa: BLE001 - not the attacker's: nothing readable
        return []
    out = []
    for e in entries:
        opened = sealer.try_open(data[e.offset:e.offset + e.length], b"blob " + e.id)
        if opened is not None:
            out.append(zstandard.ZstdDecompressor().decompress(opened) if e.encoding == 1 else opened)
    return out


def test_stolen_write_only_key_cannot_redirect_later_backups(vm: TestVM, scratch: Path, tmp_path: Path) -> None:
    """BUG: docs say a stolen hypervisor (write-only) key "exfiltrates nothing". But a write-only slot is
    the only thing telling a write-only host which X25519 public key to seal pack keys to, and nothing
    authenticates it: whoever holds the key file can wrap ``blob-id | name | meta | *their own* public key``
    in a new slot under the same secret (sorted first, the genuine slot left as it is). The host's next
    backups are then readable by the thief — and unrestorable with the repository's full key, while
    ``fleece verify`` says ok."""
    repo = tmp_path / "repo"
    init(repo)
    keyfile = tmp_path / "hv1.key"
    ok(run("key", "add", "--repo", str(repo), "--write-only", "--label", "hv1", "--new-key-file", str(keyfile),
           "--json"))
    hv = env_with(None, FLEECE_KEY_FILE=str(keyfile))
    ok(backup(vm, repo, scratch, hv))  # the host has backed up before the theft (a pin would be possible)

    stolen = keyfile.read_bytes()
    genuine = genuine_slot(repo, "write-only")
    material = unwrap(genuine, stolen)
    assert len(material) == 128
    mine = X25519PrivateKey.generate()
    my_public = mine.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    plant(repo, FIRST, make_slot(genuine["repo"], stolen, material[:96] + my_public, kind="keyfile",
                                 access="write-only"))
    before = set(files(repo))

    marker = f"HYPERVISOR-SECRET-{secrets.token_hex(4)}|".encode()
    vm.write("vda", 3 * MiB, (marker * (65536 // len(marker) + 1))[:65536])
    p = backup(vm, repo, scratch, hv)
    thief = Keys(material[:32], material[32:64], material[64:96], my_public, private=mine)
    new_packs = sorted(n for n in set(files(repo)) - before if n.startswith("data/"))
    read = [blob for name in new_packs for blob in _open_pack_as(thief, repo, name)]
    assert not any(marker in blob for blob in read), (
        f"the thief of a write-only key decrypted the next backup (exit {p.returncode}) of the host: "
        f"{len(read)} blob(s) of {len(new_packs)} new pack(s) open with the thief's private key")
    if p.returncode == 0:  # accepted: then it must be a backup the repository's full key restores
        out = tmp_path / "out"
        ok(run("restore", "--repo", str(repo), "--vm", vm.name, "--out", str(out), "--flat", "--json"))
    assert_clean(vm.guest)


@pytest.mark.parametrize("n, r, p", [(1 << 24, 8, 1), (1 << 17, 16, 16)], ids=["n=2^24", "r=16,p=16"])
def test_planted_slot_with_absurd_scrypt_cost_is_refused_quickly(copy: Path, n: int, r: int, p: int) -> None:
    """BUG: the slot check accepts n up to 2^24, r up to 32, p up to 16 although fleece never writes more
    than n=2^20, r=8, p=1. A bucket writer's planted slot (tried first) then either crashes every unlock
    with an internal error (n=2^24: hashlib refuses a maxmem above INT_MAX, ValueError) or costs every
    unlock ~15 s and 256 MiB (r=16, p=16) — and a wrong password pays it on every planted slot. Such a slot
    must be refused as tampered (naming it) or skipped, at once and within bounded memory."""
    plant(copy, FIRST, {"id": FIRST, "kind": "passphrase", "access": "full", "repo": config_doc(copy)["id"],
                        "kdf": {"name": "scrypt", "n": n, "r": r, "p": p,
                                "salt": base64.b64encode(os.urandom(16)).decode()},
                        "wrapped": base64.b64encode(os.urandom(60)).decode(), "created": "", "label": ""})
    started = time.monotonic()
    try:
        res = run("list", "--repo", str(copy), "--json", timeout=8, memory=1536 << 20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"unlocking spent over 8 s in a planted slot's scrypt (n={n}, r={r}, p={p})")
    if res.returncode != 0:
        err = failure(res, "integrity")
        assert FIRST in err["message"], err  # the slot, by id or object name
    assert time.monotonic() - started < 8


def test_kdf_time_at_the_tuning_ceiling_makes_a_usable_slot(tmp_path: Path) -> None:
    """BUG: ``fleece init --kdf-time 60000`` (any --kdf-time/FLEECE_KDF_TIME that tunes scrypt to its
    ceiling n=2^20 — from ~2.3 s here, lower on faster machines) fails with "internal error: ValueError:
    maxmem must be positive and smaller than 2147483647": crypto.KeySlot._kek passes
    maxmem=256·n·r + 64 MiB = 2 GiB + 64 MiB to hashlib.scrypt, which refuses anything above INT_MAX."""
    repo = tmp_path / "repo"
    doc = init(repo, None, "--kdf-time", "60000")
    (slot,) = [json.loads(p.read_text()) for p in (repo / "keys").iterdir()]
    assert doc["format"] == 2 and slot["kdf"]["n"] >= 1 << 14
    assert points(repo) == []  # the password opens what init made


def test_huge_planted_slot_is_not_read_whole(copy: Path) -> None:
    """BUG: read_slots reads every ``keys/`` object whole before parsing it: a bucket writer's 1.5 GiB
    object makes every host that unlocks allocate 1.5 GiB (here, inside a 1 GiB cap, a MemoryError
    reported as an internal error; on a hypervisor, the OOM killer picks a VM). A slot is a few hundred
    bytes: a big one is damage, to be named without reading it."""
    with open(copy / "keys" / FIRST, "wb") as f:
        f.truncate(1536 << 20)  # sparse: costs no disk
    res = run("list", "--repo", str(copy), "--json", timeout=30, memory=1 << 30)
    if res.returncode != 0:
        err = failure(res, "integrity")
        assert FIRST in err["message"], err


@pytest.mark.parametrize("content", [b"[]\n", b"{}\n", b'"slot"\n', b"[" * 100000 + b"]" * 100000],
                         ids=["list", "empty-object", "string", "deeply-nested"])
def test_damaged_slot_is_an_integrity_error_naming_it(copy: Path, content: bytes) -> None:
    """BUG: FORMAT.md: "A slot object that is not JSON is an error naming it". JSON that is not a slot
    object (``[]``, ``{}``, a string) gives "key slot is damaged (list indices must be integers…)" naming no
    object (KeySlot.from_json's IntegrityError has no object, read_slots only adds it for ValueError), and
    deeply nested JSON is "internal error: RecursionError" (not caught at all)."""
    plant(copy, FIRST, content)
    err = failure(run("list", "--repo", str(copy), "--json"), "integrity")
    assert FIRST in err["message"], err  # "keys/00000000": the one object to remove


@pytest.mark.parametrize("planted", ["copied-from-another-repository", "crafted-for-a-guessed-password"])
def test_a_slot_that_opens_with_the_password_but_not_the_config_does_not_lock_out(copy: Path, tmp_path: Path,
                                                                                  planted: str) -> None:
    """BUG: unlocking stops at the first slot the secret opens, then a config that fails authentication
    with that slot's key is fatal ("the config … was edited or replaced; put back the original config"):

    * a slot copied from another repository with the same password (a slot's own ``repo`` field is its
      AD; nothing compares it with the config's id) locks every user out, blaming the intact config;
    * a bucket writer can plant slots wrapping random keys for *guessed* passwords: the victim's backups
      fail exactly when a guess is right — a password oracle that costs the victim one scrypt per guess
      (or one HKDF: a passphrase slot with ``"kdf": {"name": "hkdf"}`` is accepted too).

    A slot whose key does not authenticate the config must be skipped (the genuine slot then opens); a
    slot of another repository may instead be refused by name (its ``repo`` field gives it away before
    any password is tried, so that refusal is no oracle)."""
    repo_id = config_doc(copy)["id"]
    if planted == "copied-from-another-repository":
        other = tmp_path / "other"
        init(other)
        slot = genuine_slot(other, "full")
        slot_bytes = (other / "keys" / slot["id"]).read_bytes()
        name = slot["id"]
        if name > genuine_slot(copy, "full")["id"]:  # make it the one tried first: re-make it with a low id
            slot = make_slot(slot["repo"], TEST_PASSWORD.encode(), unwrap(slot, TEST_PASSWORD.encode()))
            slot_bytes, name = json.dumps(slot).encode(), FIRST
        plant(copy, name, slot_bytes)
    else:
        plant(copy, FIRST, make_slot(repo_id, TEST_PASSWORD.encode(), os.urandom(32)))
        name = FIRST
    res = run("list", "--repo", str(copy), "--json")
    if planted == "copied-from-another-repository" and res.returncode != 0:
        err = failure(res, "integrity")
        assert name in err["message"] and err.get("object") != "config", err
        return
    assert res.returncode == 0, f"a planted slot locked the genuine one out: {res.stdout[-600:]}"
    assert len(json.loads(res.stdout)["points"]) == 2


def test_a_passphrase_slot_without_scrypt_is_refused_like_a_weakened_one(copy: Path) -> None:
    """BUG: slots with scrypt n < 2^14 are "refused as tampered", but a ``passphrase`` slot whose kdf is
    ``hkdf`` (the key-file KDF: no stretching at all) opens: KeySlot._kek picks the KDF by the slot's
    ``kdf.name``, never checking it against its ``kind``. Such a slot makes the password brute-forceable at
    HKDF speed, and is the cheap form of the planted-slot oracle above. It must be refused (or ignored)."""
    genuine = genuine_slot(copy, "full")
    master = unwrap(genuine, TEST_PASSWORD.encode())
    weak = make_slot(genuine["repo"], TEST_PASSWORD.encode(), master, kind="keyfile")
    weak["kind"] = "passphrase"  # same HKDF kek, re-wrapped under the passphrase slot's AD
    nonce = os.urandom(12)
    weak["wrapped"] = base64.b64encode(nonce + AESGCM(slot_kek(weak, TEST_PASSWORD.encode())).encrypt(
        nonce, master, slot_ad(weak))).decode()
    plant(copy, FIRST, weak)
    res = run("key", "list", "--repo", str(copy), "--json")
    if res.returncode != 0:
        err = failure(res, "integrity")
        assert FIRST in err["message"], err
        return
    current = [s["id"] for s in json.loads(res.stdout)["slots"] if s["current"]]
    assert current == [genuine["id"]], f"unlocked through the unstretched passphrase slot: {current}"


def test_non_utf8_password_in_the_environment(tmp_path: Path) -> None:
    """BUG: a password that is not UTF-8 (Latin-1 terminals, binary secrets) works from a password file
    but from FLEECE_PASSWORD is "internal error: UnicodeEncodeError: 'utf-8' codec can't encode character
    '\\udce9' in position 3" — which also prints one byte of the password and where it sits.
    credentials.passphrase_from does ``value.encode()`` on os.environ's surrogate-escaped str."""
    secret = b"caf\xe9 au lait"
    pwfile = tmp_path / "pw"
    pwfile.write_bytes(secret)
    repo = tmp_path / "repo"
    init(repo, env_with(None), "--password-file", str(pwfile))
    res = run("list", "--repo", str(repo), "--json", env=env_with(secret))
    assert res.returncode == 0, res.stdout[-600:]
    assert "\\udce9" not in res.stdout + res.stderr and "position 3" not in res.stdout + res.stderr


@pytest.mark.parametrize("command", ["head -c 3000000 /dev/zero", "yes"], ids=["3-MB-then-exit", "endless"])
def test_password_command_output_is_bounded(world: dict, command: str) -> None:
    """BUG: run_password_command collects the command's whole stdout (subprocess.run, PIPE) and only then
    keeps its first MiB. A command printing 3 MB is silently truncated into a "wrong password"; one that
    never stops (``yes``, ``cat /dev/urandom``, a confused script) grows fleece's memory at ~1 GB/s for up to
    the 120 s timeout — here, in a 1 GiB cap, "internal error: MemoryError" after 3 s. Like a password
    file over 1 MiB, it must be a usage error naming FLEECE_PASSWORD_COMMAND, in bounded memory."""
    res = run("list", "--repo", str(world["repo"]), "--json", env=env_with(None, FLEECE_PASSWORD_COMMAND=command),
              timeout=30, memory=1 << 30)
    err = failure(res, "usage", 2)
    assert "FLEECE_PASSWORD_COMMAND" in err["message"], err


# == defences that hold ====================================================================================

@pytest.mark.parametrize("edit", ["chunk_size", "compression level", "auth removed", "auth of another repo",
                                  "encryption mode none", "format 1 with keys/"])
def test_config_edits_with_a_fresh_sha256_are_refused(world: dict, copy: Path, tmp_path: Path, edit: str) -> None:
    """A bucket writer recomputes the unkeyed sha256 after each edit: every one is still refused."""
    fields = {k: v for k, v in config_doc(copy).items() if k != "sha256"}
    if edit == "chunk_size":
        fields["chunk_size"] = 1 << 20
    elif edit == "compression level":
        fields["compression"] = {"algorithm": "zstd", "level": 19}
    elif edit == "auth removed":
        fields.pop("auth")
    elif edit == "auth of another repo":
        other = tmp_path / "other"
        init(other)
        fields["auth"] = config_doc(other)["auth"]
    elif edit == "encryption mode none":
        fields["encryption"] = {"mode": "none"}
    else:
        fields = {**{k: v for k, v in fields.items() if k != "auth"}, "format": 1, "encryption": {"mode": "none"}}
    write_config(copy, fields)
    before = files(copy)
    err = error(run("list", "--repo", str(copy), "--json"))
    assert err["kind"] in ("integrity", "repository"), err
    assert error(run("verify", "--repo", str(copy), "--json"))["kind"] == err["kind"]
    assert files(copy) == before


def test_manifest_replayed_or_moved_is_an_integrity_error(world: dict, copy: Path, tmp_path: Path) -> None:
    """An old manifest replayed under a newer point name, or moved into another VM's directory, never
    opens (its object name is its AD): list flags it, restore of it writes nothing."""
    (token,) = (copy / "points").iterdir()
    full, inc = world["ids"]
    replay = "29991231T000000.000Z-deadbeef"
    shutil.copyfile(token / full, token / replay)
    other = copy / "points" / ("0" * 32)
    other.mkdir()
    shutil.copyfile(token / inc, other / inc)
    res = run("list", "--repo", str(copy), "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert [p["id"] for p in doc["points"]] == [full, inc]
    assert set(doc["damaged"]) == {f"{world['vm']}/{replay}", f"points/{other.name}/"}, doc["damaged"]
    out = tmp_path / "out"
    err = failure(run("restore", "--repo", str(copy), "--vm", world["vm"], "--point", replay, "--out", str(out),
                      "--json"), "integrity")
    assert f"points/{token.name}/{replay}" in err["message"]
    assert not out.exists() or not any(out.iterdir())


def test_index_object_from_another_repository_is_refused(world: dict, copy: Path, vm: TestVM, scratch: Path,
                                                         tmp_path: Path) -> None:
    """An index object of another repository (same password, valid name) is damage, not data."""
    other = tmp_path / "other"
    init(other)
    ok(backup(vm, other, scratch))
    for p in (other / "index").iterdir():
        shutil.copyfile(p, copy / "index" / p.name)
    res = run("verify", "--repo", str(copy), "--json")
    assert res.returncode == 1 and not json.loads(res.stdout)["ok"]
    assert any(p.name in res.stdout for p in (other / "index").iterdir()), res.stdout[-800:]


def test_write_only_slot_relabelled_full_does_not_open(world: dict, copy: Path) -> None:
    """Editing a write-only slot's ``access`` to ``full`` (its AD) makes it open nothing."""
    ok(run("key", "add", "--repo", str(copy), "--write-only", "--json",
           env=env_with(TEST_PASSWORD, FLEECE_NEW_PASSWORD="hypervisor pw")))
    slot = genuine_slot(copy, "write-only")
    plant(copy, slot["id"], {**slot, "access": "full"})
    failure(run("list", "--repo", str(copy), "--json", env=env_with("hypervisor pw")), "key")
    out = copy.parent / "out"
    failure(run("restore", "--repo", str(copy), "--vm", world["vm"], "--out", str(out), "--json",
                env=env_with("hypervisor pw")), "key")
    assert not out.exists()


def test_passwords_never_appear_in_any_output(world: dict, copy: Path, tmp_path: Path) -> None:
    """Neither the password, a wrong one, nor a new one shows in stdout/stderr, at -vv and with --json,
    on success or failure."""
    secret, wrong, new = "Sekrit-Zq7-alpha", "Sekrit-Zq7-wrong", "Sekrit-Zq7-newpw"
    repo = tmp_path / "repo"
    init(repo, env_with(secret))
    out = tmp_path / "out"
    runs = [
        run("list", "--repo", str(repo), "-vv", "--json", env=env_with(secret)),
        run("list", "--repo", str(repo), "-vv", env=env_with(wrong)),
        run("verify", "--repo", str(repo), "-vv", "--json", env=env_with(wrong)),
        run("restore", "--repo", str(repo), "--vm", "nope", "--out", str(out), "-vv", "--json", env=env_with(secret)),
        run("key", "list", "--repo", str(repo), "-vv", "--json", env=env_with(secret)),
        run("key", "add", "--repo", str(repo), "-vv", "--json", env=env_with(wrong, FLEECE_NEW_PASSWORD=new)),
        run("key", "add", "--repo", str(repo), "-vv", "--json", env=env_with(secret, FLEECE_NEW_PASSWORD=new)),
        run("key", "passwd", "--repo", str(repo), "-vv", "--json", env=env_with(new, FLEECE_NEW_PASSWORD=secret)),
        run("list", "--repo", str(repo), "-vv", "--json", env=env_with(None, FLEECE_PASSWORD_COMMAND=f"echo {wrong}")),
    ]
    assert [r.returncode for r in runs] == [0, 1, 1, 1, 0, 1, 0, 0, 1], [(r.returncode, r.stderr[-200:]) for r in runs]
    for r in runs:
        for s in (secret, wrong, new):
            assert s not in r.stdout and s not in r.stderr, (s, r.args, r.stderr[-400:])


def test_paper_key_tolerates_layout_and_refuses_typos_and_other_repositories(world: dict, copy: Path,
                                                                             tmp_path: Path) -> None:
    paper = ok(run("key", "export", "--paper", "--repo", str(copy), "--json"))["paper_key"]
    digits = paper.replace(" ", "")
    sheet = tmp_path / "paper"

    def add(text: str) -> subprocess.CompletedProcess[str]:
        sheet.write_text(text)
        return run("key", "add", "--repo", str(copy), "--paper-key-file", str(sheet), "--json",
                   env=env_with(None, FLEECE_NEW_PASSWORD=f"recovered {secrets.token_hex(2)}"))

    # as a person types it back: upper case, dashes, line breaks, extra spaces
    laid_out = "\n  ".join("-".join(digits[i:i + 8] for i in range(j, j + 24, 8)) for j in range(0, 72, 24)).upper()
    assert ok(add(laid_out + "\r\n"))["slot"]["access"] == "full"
    swapped = digits[:10] + digits[11] + digits[10] + digits[12:]
    if swapped != digits:
        failure(add(swapped), "usage", 2)
    failure(add(digits[:-1]), "usage", 2)
    other = tmp_path / "other"
    init(other)
    foreign = ok(run("key", "export", "--paper", "--repo", str(other), "--json"))["paper_key"]
    failure(add(foreign), "key")


def test_unencrypted_repository_never_reads_the_password_sources(tmp_path: Path) -> None:
    """Format 1 ignores the password variables: a hanging command or a FIFO nobody writes is never
    touched (so it cannot stall a plaintext repository's commands)."""
    repo = tmp_path / "plain"
    init(repo, env_with(None), "--no-encryption")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for extra in ({"FLEECE_PASSWORD_COMMAND": "sleep 600"}, {"FLEECE_PASSWORD_FILE": str(fifo)}):
        assert points(repo, env_with(None, **extra)) == []  # within run()'s timeout, well under it


@pytest.mark.parametrize("path", ["directory", "/dev/zero", "/dev/urandom", "missing"])
def test_odd_password_files_are_usage_errors(world: dict, tmp_path: Path, path: str) -> None:
    target = {"directory": str(tmp_path), "missing": str(tmp_path / "nope")}.get(path, path)
    started = time.monotonic()
    err = failure(run("list", "--repo", str(world["repo"]), "--json", env=env_with(None, FLEECE_PASSWORD_FILE=target),
                      timeout=30), "usage", 2)
    assert "FLEECE_PASSWORD_FILE" in err["message"] and time.monotonic() - started < 10


def test_two_racing_key_removals_never_remove_the_last_full_key(tmp_path: Path) -> None:
    """Two operators, each unlocked with one of the only two full keys, remove each other's slot at the
    same moment: however the removals interleave, a full key that opens the repository remains."""
    for attempt in range(3):
        repo = tmp_path / f"repo{attempt}"
        init(repo, env_with("first pw"))
        ok(run("key", "add", "--repo", str(repo), "--json", env=env_with("first pw", FLEECE_NEW_PASSWORD="second pw")))
        ids = {pw: next(s["id"] for s in ok(run("key", "list", "--repo", str(repo), "--json", env=env_with(pw)))["slots"]
                        if s["current"]) for pw in ("first pw", "second pw")}
        racers = [subprocess.Popen([FLEECE, "key", "remove", "--repo", str(repo), ids[other], "--json"],
                                   env=env_with(mine), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
                  for mine, other in (("first pw", "second pw"), ("second pw", "first pw"))]
        codes = [r.wait(60) for r in racers]
        for r in racers:
            r.stdout.close()  # type: ignore[union-attr]
            r.stderr.close()  # type: ignore[union-attr]
        left = [json.loads(p.read_text()) for p in (repo / "keys").iterdir()]
        assert [s for s in left if s["access"] == "full"], (codes, left)
        assert codes.count(0) <= 1, codes
        opened = [pw for pw in ("first pw", "second pw")
                  if run("list", "--repo", str(repo), "--json", env=env_with(pw)).returncode == 0]
        assert opened and {s["id"] for s in left} == {ids[pw] for pw in opened}, (opened, left)
