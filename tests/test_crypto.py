"""The encryption primitives of format 2 (repository/crypto.py): short, exact, no repository yet."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import pytest

from fleece.repository import crypto
from fleece.repository.crypto import (OVERHEAD, PACK_HEADER_SIZE, KeySlot, Keys, MasterKey, export_paper,
                                      import_paper, new_slot, unlock)
from fleece.repository.errors import IntegrityError, KeyAccessError, UsageError, WrongKeyError

FAST = crypto.MIN_SCRYPT_N  # tests use scrypt's floor; real slots are tuned to ~0.5 s
REPO = "0123456789abcdef0123456789abcdef"  # a repository id, as slots bind it


def stored(slot: KeySlot) -> KeySlot:
    """The slot as another process reads it back from ``keys/<id>`` (through JSON)."""
    return KeySlot.from_json(json.loads(json.dumps(slot.to_json())))


def test_seal_open_round_trip_and_fresh_nonces() -> None:
    key = MasterKey.generate()
    a = key.meta.seal(b"guest secret", b"points/tok/p1")
    b = key.meta.seal(b"guest secret", b"points/tok/p1")
    assert a != b and len(a) == len(b"guest secret") + OVERHEAD  # a fresh nonce each time
    assert b"guest secret" not in a
    assert key.meta.open(a, b"points/tok/p1", "p1") == b"guest secret"


def test_pack_key_round_trip_and_fresh_keys() -> None:
    key = MasterKey.generate()
    sealer, header = key.new_pack_key()
    other_sealer, other_header = key.new_pack_key()
    assert len(header) == PACK_HEADER_SIZE and header != other_header  # a fresh key for every pack
    sealed = sealer.seal(b"disk bytes", b"blob " + b"\1" * 32)
    assert b"disk bytes" not in sealed
    assert key.pack_key(header, "pack p").open(sealed, b"blob " + b"\1" * 32, "blob") == b"disk bytes"
    with pytest.raises(IntegrityError, match="authentication"):
        key.pack_key(other_header, "pack q").open(sealed, b"blob " + b"\1" * 32, "blob")  # another pack's key
    with pytest.raises(IntegrityError, match="authentication"):
        MasterKey.generate().pack_key(header, "pack p")  # another repository's key
    damaged = bytearray(header)
    damaged[-1] ^= 1
    with pytest.raises(IntegrityError, match="pack key of pack p"):
        key.pack_key(bytes(damaged), "pack p")
    with pytest.raises(IntegrityError, match="damaged pack key header"):
        key.pack_key(header[:-1], "pack p")


@pytest.mark.parametrize("attack", ["other object", "flipped bit", "truncated", "other key", "empty"])
def test_open_refuses_anything_but_the_original(attack: str) -> None:
    key = MasterKey.generate()
    sealed = bytearray(key.meta.seal(b"manifest body", b"points/vm/p1"))
    ad, opener = b"points/vm/p1", key
    if attack == "other object":
        ad = b"points/vm/p2"  # a manifest moved to another point's name
    elif attack == "flipped bit":
        sealed[20] ^= 1
    elif attack == "truncated":
        sealed = sealed[:-1]
    elif attack == "other key":
        opener = MasterKey.generate()
    else:
        sealed = bytearray()
    with pytest.raises(IntegrityError, match="points/vm/p1 .*authentication") as info:
        opener.meta.open(bytes(sealed), ad, "points/vm/p1")
    assert info.value.object == "points/vm/p1"


def test_keyed_ids_and_names_leak_nothing_across_repositories() -> None:
    one, two = MasterKey.generate(), MasterKey.generate()
    assert one.blob_id(b"x" * 4096) == one.blob_id(bytearray(b"x" * 4096))  # dedup inside a repository
    assert one.blob_id(b"x" * 4096) != two.blob_id(b"x" * 4096)  # no guessing across keys
    assert one.blob_id(b"x") != hashlib.sha256(b"x").digest()
    assert one.name_token("vm", "db01") == one.name_token("vm", "db01")
    assert one.name_token("vm", "db01") != two.name_token("vm", "db01")
    assert one.name_token("vm", "db01") != one.name_token("disk", "db01")  # kinds are separated
    assert "db01" not in one.name_token("vm", "db01")


def test_derived_keys_are_distinct_and_stable() -> None:
    secret = bytes(range(32))
    a, b = MasterKey(secret), MasterKey(secret)
    sealed = a.meta.seal(b"p", b"ad")
    assert b.meta.open(sealed, b"ad", "x") == b"p"  # the same secret gives the same keys
    _, header = a.new_pack_key()
    assert b.pack_key(header, "pack") is not None  # ...and the same X25519 key pair
    assert a.public == b.public
    parts = [a._id_key, a._name_key, a._meta_key, a.public]  # noqa: SLF001 - one key, one purpose
    assert len(set(parts)) == 4 and secret not in parts
    assert a.mac("config", b"x") != a.mac("other", b"x")


def test_write_only_view_adds_but_cannot_read() -> None:
    master = MasterKey.generate()
    view = master.write_only()
    assert isinstance(view, Keys) and not isinstance(view, MasterKey)
    assert master.can_read and master.access == crypto.FULL
    assert not view.can_read and view.access == crypto.WRITE_ONLY
    # the same ids and names: a write-only host dedups against, and adds to, the same repository
    assert view.blob_id(b"chunk") == master.blob_id(b"chunk")
    assert view.name_token("vm", "db01") == master.name_token("vm", "db01")
    assert view.mac("config", b"cfg") == master.mac("config", b"cfg")
    # metadata is shared both ways
    assert master.meta.open(view.meta.seal(b"manifest", b"ad"), b"ad", "m") == b"manifest"
    assert view.meta.open(master.meta.seal(b"manifest", b"ad"), b"ad", "m") == b"manifest"
    # a pack sealed by the write-only view opens with the master key, and with nothing the view has
    sealer, header = view.new_pack_key()
    sealed = sealer.seal(b"disk content", b"blob x")
    assert master.pack_key(header, "pack p").open(sealed, b"blob x", "blob") == b"disk content"
    with pytest.raises(KeyAccessError, match="write-only") as info:
        view.pack_key(header, "pack p")
    assert info.value.object == "pack p"
    _, own_header = master.new_pack_key()
    with pytest.raises(KeyAccessError):
        view.pack_key(own_header, "pack q")
    material = view.write_only_material()
    assert len(material) == 4 * crypto.KEY_SIZE and master.secret not in material
    with pytest.raises(ValueError):
        Keys.from_write_only(material[:-1])


def test_slots_add_unlock_and_refuse_the_wrong_passphrase() -> None:
    master = MasterKey.generate()
    first = new_slot(master, b"correct horse", repo=REPO, scrypt_n=FAST)
    second = new_slot(master, b"battery staple", repo=REPO, scrypt_n=FAST, label="ops")
    slots = [stored(s) for s in (first, second)]
    keys, slot = unlock(slots, b"battery staple", "repo")
    assert isinstance(keys, MasterKey) and keys.secret == master.secret
    assert slot.id == second.id and slot.label == "ops" and slot.repo == REPO
    keys, slot = unlock(slots, b"correct horse", "repo")
    assert isinstance(keys, MasterKey) and keys.secret == master.secret and slot.id == first.id
    with pytest.raises(WrongKeyError, match="wrong password .*for repo .*2 key slot") as info:
        unlock(slots, b"Correct horse", "repo", source="FLEECE_PASSWORD")
    assert "FLEECE_PASSWORD" in str(info.value) and info.value.object == "repo"
    assert not isinstance(info.value, KeyAccessError)
    # removing the old slot leaves the new passphrase working, the old one useless
    with pytest.raises(WrongKeyError):
        unlock(slots[1:], b"correct horse", "repo")
    keys, _ = unlock(slots[1:], b"battery staple", "repo")
    assert isinstance(keys, MasterKey) and keys.secret == master.secret


def test_key_file_slot_and_its_minimum() -> None:
    master = MasterKey.generate()
    material = bytes(range(64))
    slot = stored(new_slot(master, material, repo=REPO, kind="keyfile"))
    assert slot.kdf["name"] == "hkdf"
    keys, opened = unlock([slot], material, "repo", kind="keyfile")
    assert isinstance(keys, MasterKey) and keys.secret == master.secret and opened.id == slot.id
    with pytest.raises(WrongKeyError, match="wrong key file"):
        unlock([slot], material[:-1] + b"\0", "repo", kind="keyfile")
    # a key file never opens a passphrase slot, nor the other way round: the kinds are separate
    with pytest.raises(WrongKeyError, match="no password key slot"):
        unlock([slot], material, "repo", kind="passphrase")
    with pytest.raises(UsageError, match="at least 32 random bytes"):
        new_slot(master, b"short", repo=REPO, kind="keyfile")
    with pytest.raises(UsageError, match="empty passphrase"):
        new_slot(master, b"", repo=REPO, scrypt_n=FAST)


def test_write_only_slots() -> None:
    master = MasterKey.generate()
    slot = stored(new_slot(master, b"hypervisor pw", repo=REPO, access=crypto.WRITE_ONLY, scrypt_n=FAST))
    assert slot.access == crypto.WRITE_ONLY
    keys, _ = unlock([slot], b"hypervisor pw", "repo")
    assert not isinstance(keys, MasterKey) and not keys.can_read
    assert keys.blob_id(b"c") == master.blob_id(b"c") and keys.public == master.public
    # a write-only key can hand out write-only slots, never a full one
    again = stored(new_slot(keys, b"second host", repo=REPO, access=crypto.WRITE_ONLY, scrypt_n=FAST))
    assert not unlock([again], b"second host", "repo")[0].can_read
    with pytest.raises(KeyAccessError, match="full key slot"):
        new_slot(keys, b"escalate", repo=REPO, access=crypto.FULL, scrypt_n=FAST)
    with pytest.raises(ValueError):
        new_slot(master, b"pw", repo=REPO, access="read-only", scrypt_n=FAST)


@pytest.mark.parametrize("edit", ["other repository", "relabelled access", "other slot id", "other kind"])
def test_a_slot_is_bound_to_its_repository_id_and_access(edit: str) -> None:
    master = MasterKey.generate()
    secret = b"hypervisor pw" if edit != "other kind" else secrets.token_bytes(32)
    kind = "keyfile" if edit == "other kind" else "passphrase"
    slot = new_slot(master, secret, repo=REPO, kind=kind, access=crypto.WRITE_ONLY, scrypt_n=FAST)
    doc = json.loads(json.dumps(slot.to_json()))
    assert unlock([KeySlot.from_json(doc)], secret, "repo", kind=kind)[0].public == master.public  # as stored
    if edit == "other repository":
        doc["repo"] = "f" * 32  # the slot copied into another repository (whose id differs)
    elif edit == "relabelled access":
        doc["access"] = crypto.FULL  # the JSON edited to claim a full key
    elif edit == "other slot id":
        doc["id"] = "deadbeef"
    else:
        doc["kind"] = "passphrase"  # a key-file slot passed off as a passphrase one (with hkdf kept)
    # refused: as a wrong key, or (a passphrase slot with the key-file KDF) as a tampered slot
    with pytest.raises((WrongKeyError, IntegrityError)) as info:
        unlock([KeySlot.from_json(doc)], secret, "repo", kind=doc["kind"])
    assert not isinstance(info.value, KeyAccessError)


def test_a_weakened_or_damaged_slot_is_refused() -> None:
    master = MasterKey.generate()
    slot = new_slot(master, b"pw", repo=REPO, scrypt_n=FAST)
    assert unlock([stored(slot)], b"pw", "repo")[0].can_read
    for weakened in ({"n": 2}, {"n": FAST // 2}, {"n": FAST + 1}, {"n": 1 << 25}, {"r": 0}, {"r": 64},
                     {"p": 0}, {"p": 17}):
        weak = KeySlot.from_json({**slot.to_json(), "kdf": {**slot.kdf, **weakened}})
        with pytest.raises(IntegrityError, match="scrypt parameters fleece never writes"):
            unlock([weak], b"pw", "repo")
    no_salt = KeySlot.from_json({**slot.to_json(), "kdf": {k: v for k, v in slot.kdf.items() if k != "salt"}})
    with pytest.raises(IntegrityError, match="damaged KDF parameters"):
        unlock([no_salt], b"pw", "repo")
    for kdf in ("md5", "hkdf"):  # hkdf: a passphrase slot without stretching
        other_kdf = KeySlot.from_json({**slot.to_json(), "kdf": {**slot.kdf, "name": kdf}})
        with pytest.raises(IntegrityError, match=f"passphrase slot with KDF '{kdf}'"):
            unlock([other_kdf], b"pw", "repo")
    not_base64 = KeySlot.from_json({**slot.to_json(), "wrapped": "***"})
    with pytest.raises(IntegrityError, match="not base64"):
        unlock([not_base64], b"pw", "repo")
    with pytest.raises(IntegrityError, match="damaged"):
        KeySlot.from_json({"kind": "passphrase"})
    with pytest.raises(IntegrityError, match="not a JSON object"):
        KeySlot.from_json(["not", "a", "slot"], "keys/x")
    # a newer fleece's slot kind or access: listed, never used, and no reason to refuse the others
    for field, value in (("kind", "yubikey"), ("access", "admin")):
        newer = KeySlot.from_json({**slot.to_json(), field: value})
        assert not newer.supported
        assert unlock([newer, stored(slot)], b"pw", "repo")[1].id == slot.id
        with pytest.raises(WrongKeyError, match="no password key slot"):
            unlock([newer], b"pw", "repo")
    # a damaged slot next to the genuine one does not lock it out
    weak = KeySlot.from_json({**slot.to_json(), "id": "00000000", "kdf": {**slot.kdf, "n": 2}})
    assert unlock([weak, stored(slot)], b"pw", "repo")[1].id == slot.id
    with pytest.raises(IntegrityError, match="no key slots left"):
        unlock([], b"pw", "repo")


def test_scrypt_tuning_aims_at_the_target() -> None:
    assert crypto.tune_scrypt(0) == crypto.MIN_SCRYPT_N  # never below the floor
    n = crypto.tune_scrypt(0.2)
    assert n >= crypto.MIN_SCRYPT_N and n & (n - 1) == 0

    started = time.perf_counter()
    hashlib.scrypt(b"x", salt=secrets.token_bytes(16), n=n, r=8, p=1, maxmem=256 * n * 8 + (64 << 20), dklen=32)
    took = time.perf_counter() - started
    assert 0.05 < took < 1.0, (n, took)  # within a factor of ~4 of 0.2 s on a loaded 2-core machine


def test_paper_key_round_trip_and_typo() -> None:
    master = MasterKey.generate()
    paper = export_paper(master)
    groups = paper.split()
    assert len(groups) == 9 and all(len(g) == 8 for g in groups)
    assert "".join(groups[:8]) == master.secret.hex()
    back = import_paper(paper.upper().replace(" ", "-"))  # as typed back
    assert isinstance(back, MasterKey) and back.secret == master.secret
    sealer, header = master.new_pack_key()
    assert back.pack_key(header, "pack").open(sealer.seal(b"d", b"ad"), b"ad", "blob") == b"d"  # a full key
    typo = paper[:5] + ("0" if paper[5] != "0" else "1") + paper[6:]
    with pytest.raises(UsageError, match="mistyped"):
        import_paper(typo)
    swapped = paper[:-1] + ("0" if paper[-1] != "0" else "1")  # a typo in the check group itself
    with pytest.raises(UsageError, match="mistyped"):
        import_paper(swapped)
    with pytest.raises(UsageError, match="72 hex digits"):
        import_paper(paper[:-3])
