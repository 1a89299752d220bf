"""The encryption primitives of format 2 (repository/crypto.py): short, exact, no repository yet."""

from __future__ import annotations

import time

import pytest

from fleece.repository import crypto
from fleece.repository.crypto import OVERHEAD, MasterKey, import_paper, export_paper, new_slot, unlock
from fleece.repository.errors import IntegrityError, UsageError, WrongKeyError

FAST = crypto.MIN_SCRYPT_N  # tests use scrypt's floor; real slots are tuned to ~0.5 s


def test_seal_open_round_trip_and_fresh_nonces() -> None:
    key = MasterKey.generate()
    a = key.data.seal(b"guest secret", b"data/ab/pack1")
    b = key.data.seal(b"guest secret", b"data/ab/pack1")
    assert a != b and len(a) == len(b"guest secret") + OVERHEAD  # a fresh nonce each time
    assert b"guest secret" not in a
    assert key.data.open(a, b"data/ab/pack1", "pack1") == b"guest secret"


@pytest.mark.parametrize("attack", ["other object", "flipped bit", "truncated", "other key", "empty"])
def test_open_refuses_anything_but_the_original(attack: str) -> None:
    key = MasterKey.generate()
    sealed = bytearray(key.data.seal(b"manifest body", b"points/vm/p1"))
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
    with pytest.raises(IntegrityError, match="points/vm/p1 .*(authentication|short)") as info:
        opener.data.open(bytes(sealed), ad, "points/vm/p1")
    assert info.value.object == "points/vm/p1"


def test_keyed_ids_and_names_leak_nothing_across_repositories() -> None:
    one, two = MasterKey.generate(), MasterKey.generate()
    assert one.blob_id(b"x" * 4096) == one.blob_id(bytearray(b"x" * 4096))  # dedup inside a repository
    assert one.blob_id(b"x" * 4096) != two.blob_id(b"x" * 4096)  # no guessing across keys
    import hashlib
    assert one.blob_id(b"x") != hashlib.sha256(b"x").digest()
    assert one.name_token("vm", "db01") == one.name_token("vm", "db01")
    assert one.name_token("vm", "db01") != two.name_token("vm", "db01")
    assert one.name_token("vm", "db01") != one.name_token("disk", "db01")  # kinds are separated
    assert "db01" not in one.name_token("vm", "db01")


def test_derived_keys_are_distinct_and_stable() -> None:
    secret = bytes(range(32))
    a, b = MasterKey(secret), MasterKey(secret)
    sealed = a.data.seal(b"p", b"ad")
    assert b.data.open(sealed, b"ad", "x") == b"p"  # the same secret gives the same keys
    assert a._id_key != a._name_key  # noqa: SLF001 - one key, one purpose


def test_slots_add_unlock_and_refuse_the_wrong_passphrase() -> None:
    master = MasterKey.generate()
    first = new_slot(master, b"correct horse", scrypt_n=FAST)
    second = new_slot(master, b"battery staple", scrypt_n=FAST, label="ops")
    slots = [crypto.KeySlot.from_json(s.to_json()) for s in (first, second)]  # as stored
    assert unlock(slots, b"battery staple", "repo").secret == master.secret
    assert unlock(slots, b"correct horse", "repo").secret == master.secret
    with pytest.raises(WrongKeyError, match="wrong password or key file for repo .*2 key slot"):
        unlock(slots, b"Correct horse", "repo")
    # removing the old slot leaves the new passphrase working, the old one useless
    with pytest.raises(WrongKeyError):
        unlock(slots[1:], b"correct horse", "repo")
    assert unlock(slots[1:], b"battery staple", "repo").secret == master.secret


def test_key_file_slot_and_its_minimum() -> None:
    master = MasterKey.generate()
    material = bytes(range(64))
    slot = new_slot(master, material, kind="keyfile")
    assert unlock([slot], material, "repo").secret == master.secret
    with pytest.raises(WrongKeyError):
        unlock([slot], material[:-1] + b"\0", "repo")
    with pytest.raises(UsageError, match="at least 32 random bytes"):
        new_slot(master, b"short", kind="keyfile")
    with pytest.raises(UsageError, match="empty passphrase"):
        new_slot(master, b"", scrypt_n=FAST)


def test_a_weakened_or_damaged_slot_is_refused() -> None:
    master = MasterKey.generate()
    slot = new_slot(master, b"pw", scrypt_n=FAST)
    weak = crypto.KeySlot.from_json({**slot.to_json(), "kdf": {**slot.kdf, "n": 2}})
    with pytest.raises(IntegrityError, match="weakened or invalid scrypt"):
        unlock([weak], b"pw", "repo")
    with pytest.raises(IntegrityError, match="damaged"):
        crypto.KeySlot.from_json({"kind": "passphrase"})
    with pytest.raises(IntegrityError, match="no key slots left"):
        unlock([], b"pw", "repo")


def test_scrypt_tuning_aims_at_the_target() -> None:
    n = crypto.tune_scrypt(0.2)
    assert n >= crypto.MIN_SCRYPT_N and n & (n - 1) == 0
    import hashlib
    import secrets

    started = time.perf_counter()
    hashlib.scrypt(b"x", salt=secrets.token_bytes(16), n=n, r=8, p=1, maxmem=256 * n * 8 + (64 << 20), dklen=32)
    took = time.perf_counter() - started
    assert 0.05 < took < 1.0, (n, took)  # within a factor of ~4 of 0.2 s on a loaded 2-core machine


def test_paper_key_round_trip_and_typo() -> None:
    master = MasterKey.generate()
    paper = export_paper(master)
    groups = paper.split()
    assert len(groups) == 9 and all(len(g) == 8 for g in groups)
    assert import_paper(paper.upper().replace(" ", "-")).secret == master.secret  # as typed back
    typo = paper[:5] + ("0" if paper[5] != "0" else "1") + paper[6:]
    with pytest.raises(UsageError, match="mistyped"):
        import_paper(typo)
    with pytest.raises(UsageError, match="72 hex digits"):
        import_paper(paper[:-3])
