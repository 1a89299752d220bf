"""Where an encrypted repository's secret comes from (repository/credentials.py): the environment
variables, their exclusivity, files, commands and ``FLEECE_KDF_TIME``. Real files and real processes;
every failure must be a one-line :class:`UsageError` that never shows the secret."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from fleece.repository import credentials
from fleece.repository.credentials import (KEYFILE, PASSPHRASE, PASSWORD_VARIABLES, Credential, from_environment,
                                           kdf_seconds)
from fleece.repository.errors import UsageError

PY = shlex.quote(sys.executable)


def one_line_usage(variables: dict[str, str], match: str) -> UsageError:
    """The usage error *variables* give, checked to be one line."""
    with pytest.raises(UsageError, match=match) as info:
        from_environment(variables)
    assert "\n" not in str(info.value) and info.value.exit == 2
    return info.value


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# -- which variable ---------------------------------------------------------------------------------------

def test_nothing_set_gives_none() -> None:
    assert from_environment({}) is None
    assert from_environment({"FLEECE_REPO": "/x", "PASSWORD": "not ours"}) is None


def test_each_variable_alone(tmp_path: Path) -> None:
    got = from_environment({"FLEECE_PASSWORD": "s3cret pw"})
    assert got == Credential(PASSPHRASE, b"s3cret pw", "FLEECE_PASSWORD")
    pw_file = write(tmp_path / "pw", b"from a file\n")
    got = from_environment({"FLEECE_PASSWORD_FILE": pw_file})
    assert (got.kind, got.secret, got.source) == (PASSPHRASE, b"from a file", f"FLEECE_PASSWORD_FILE {pw_file}")
    got = from_environment({"FLEECE_PASSWORD_COMMAND": f"{PY} -c 'print(\"from a command\")'"})
    assert (got.kind, got.secret, got.source) == (PASSPHRASE, b"from a command", "FLEECE_PASSWORD_COMMAND")
    key = os.urandom(32) + b"\n"
    key_path = write(tmp_path / "key", key)
    got = from_environment({"FLEECE_KEY_FILE": key_path})
    assert (got.kind, got.secret, got.source) == (KEYFILE, key, f"FLEECE_KEY_FILE {key_path}")  # bytes as they are
    # the secret never shows in a credential's repr (logs, tracebacks)
    assert "s3cret" not in repr(from_environment({"FLEECE_PASSWORD": "s3cret pw"}))


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*PASSWORD_VARIABLES, "FLEECE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() is None
    monkeypatch.setenv("FLEECE_PASSWORD", "env pw")
    assert from_environment() == Credential(PASSPHRASE, b"env pw", "FLEECE_PASSWORD")


@pytest.mark.parametrize("pair", [("FLEECE_PASSWORD", "FLEECE_PASSWORD_FILE"),
                                  ("FLEECE_PASSWORD", "FLEECE_PASSWORD_COMMAND"),
                                  ("FLEECE_PASSWORD_FILE", "FLEECE_PASSWORD_COMMAND")])
def test_two_password_variables_are_a_usage_error(tmp_path: Path, pair: tuple[str, str]) -> None:
    values = {"FLEECE_PASSWORD": "pw", "FLEECE_PASSWORD_FILE": write(tmp_path / "pw", b"pw"),
              "FLEECE_PASSWORD_COMMAND": f"{PY} -c 'print(1)'"}
    err = one_line_usage({name: values[name] for name in pair}, f"{pair[0]} and {pair[1]} are both set")
    assert err.message.endswith("keep one of them")
    # set but empty still counts as set: which one was meant is not guessed
    one_line_usage({pair[0]: values[pair[0]], pair[1]: ""}, "both set")


def test_all_three_password_variables(tmp_path: Path) -> None:
    one_line_usage({"FLEECE_PASSWORD": "a", "FLEECE_PASSWORD_FILE": write(tmp_path / "pw", b"b"),
                    "FLEECE_PASSWORD_COMMAND": "true"},
                   "FLEECE_PASSWORD and FLEECE_PASSWORD_FILE and FLEECE_PASSWORD_COMMAND")


@pytest.mark.parametrize("name", PASSWORD_VARIABLES)
def test_key_file_and_a_password_variable_are_a_usage_error(tmp_path: Path, name: str) -> None:
    key = write(tmp_path / "key", os.urandom(32))
    one_line_usage({"FLEECE_KEY_FILE": key, name: "x"}, "FLEECE_KEY_FILE and a FLEECE_PASSWORD\\* variable")
    one_line_usage({"FLEECE_KEY_FILE": key, name: ""}, "FLEECE_KEY_FILE and a FLEECE_PASSWORD\\* variable")


def test_empty_password_is_a_usage_error() -> None:
    err = one_line_usage({"FLEECE_PASSWORD": ""}, "FLEECE_PASSWORD is set but empty")
    assert err.object is None


# -- files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "secret"), [
    (b"pw", b"pw"),
    (b"pw\n", b"pw"),
    (b"pw\r\n", b"pw"),
    (b"pw\n\n", b"pw\n"),  # exactly one newline goes
    (b"pw \n", b"pw "),  # spaces are part of a passphrase
    (b" pw\t\n", b" pw\t"),
    (b"two\nlines\n", b"two\nlines"),
    ("pässwörd\n".encode(), "pässwörd".encode()),
])
def test_password_file_strips_exactly_one_trailing_newline(tmp_path: Path, content: bytes, secret: bytes) -> None:
    got = from_environment({"FLEECE_PASSWORD_FILE": write(tmp_path / "pw", content)})
    assert got is not None and got.secret == secret


def test_password_file_errors(tmp_path: Path) -> None:
    one_line_usage({"FLEECE_PASSWORD_FILE": str(tmp_path / "missing")},
                   f"cannot read FLEECE_PASSWORD_FILE {tmp_path / 'missing'}: No such file")
    one_line_usage({"FLEECE_PASSWORD_FILE": str(tmp_path)}, "cannot read FLEECE_PASSWORD_FILE .*directory")
    one_line_usage({"FLEECE_PASSWORD_FILE": ""}, "FLEECE_PASSWORD_FILE is empty: name a file")
    big = write(tmp_path / "big", b"x" * (credentials.MAX_SECRET + 1))
    one_line_usage({"FLEECE_PASSWORD_FILE": big}, "larger than")
    exact = write(tmp_path / "exact", b"x" * credentials.MAX_SECRET)
    assert len(from_environment({"FLEECE_PASSWORD_FILE": exact}).secret) == credentials.MAX_SECRET
    one_line_usage({"FLEECE_KEY_FILE": str(tmp_path / "missing")}, "cannot read FLEECE_KEY_FILE")


# -- commands ---------------------------------------------------------------------------------------------

def command(code: str) -> str:
    """A FLEECE_PASSWORD_COMMAND running *code* in this Python (no shell involved)."""
    return f"{PY} -c {shlex.quote(code)}"


def test_password_command_output(tmp_path: Path) -> None:
    def secret(cmd: str) -> bytes:
        got = from_environment({"FLEECE_PASSWORD_COMMAND": cmd})
        assert got is not None and got.kind == PASSPHRASE
        return got.secret

    assert secret(command("print('pw')")) == b"pw"
    assert secret(command("import sys; sys.stdout.write('pw\\n\\n')")) == b"pw\n"  # one newline goes
    assert secret(command("import sys; sys.stdout.write('pw ')")) == b"pw "
    assert secret(command("import sys; print('pw'); print('noise', file=sys.stderr)")) == b"pw"  # stderr ignored
    # arguments are split like a shell would, quotes included
    assert secret(f"{PY} -c 'import sys; print(sys.argv[1])' 'two words'") == b"two words"
    # stdin is not the terminal: a command that reads it gets end of file at once
    assert secret(command("import sys; print(repr(sys.stdin.read()))")) == b"''"


def test_password_command_runs_without_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    got = from_environment({"FLEECE_PASSWORD_COMMAND": f"echo pw; touch {marker}"})
    assert got is not None and got.secret == f"pw; touch {marker}".encode()
    assert not marker.exists()
    got = from_environment({"FLEECE_PASSWORD_COMMAND": "echo $HOME `id` $(id) *"})
    assert got is not None and got.secret == b"$HOME `id` $(id) *"
    got = from_environment({"FLEECE_PASSWORD_COMMAND": "echo a | cat"})
    assert got is not None and got.secret == b"a | cat"


def test_password_command_failures_are_one_line_usage_errors(tmp_path: Path) -> None:
    err = one_line_usage({"FLEECE_PASSWORD_COMMAND": command(
        "import sys; print('traceback line', file=sys.stderr); print('vault is sealed', file=sys.stderr); "
        "print('partial secret'); sys.exit(3)")}, r"FLEECE_PASSWORD_COMMAND: .* failed: vault is sealed$")
    assert "partial secret" not in err.message and "traceback line" not in err.message
    one_line_usage({"FLEECE_PASSWORD_COMMAND": command("import sys; sys.exit(5)")}, "failed: exit status 5$")
    one_line_usage({"FLEECE_PASSWORD_COMMAND": command("import sys; sys.stderr.write('x' * 5000); sys.exit(1)")},
                   "failed: x{200}$")  # a flood of stderr is cut
    one_line_usage({"FLEECE_PASSWORD_COMMAND": "/nonexistent/pass show fleece"},
                   "command '/nonexistent/pass' not found")
    one_line_usage({"FLEECE_PASSWORD_COMMAND": "fleece-no-such-command-xyz"}, "'fleece-no-such-command-xyz' not found")
    script = write(tmp_path / "not-executable", b"#!/bin/sh\necho pw\n")
    os.chmod(script, 0o644)
    one_line_usage({"FLEECE_PASSWORD_COMMAND": script}, "cannot run .*Permission denied")
    one_line_usage({"FLEECE_PASSWORD_COMMAND": str(tmp_path)}, "cannot run .*Permission denied")  # a directory
    one_line_usage({"FLEECE_PASSWORD_COMMAND": "echo 'unterminated"}, "cannot be parsed")
    one_line_usage({"FLEECE_PASSWORD_COMMAND": ""}, "is empty: give a command")
    one_line_usage({"FLEECE_PASSWORD_COMMAND": "   "}, "is empty: give a command")


def test_password_command_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "COMMAND_TIMEOUT", 0.3)
    one_line_usage({"FLEECE_PASSWORD_COMMAND": command("import time; time.sleep(30)")},
                   "'.*python.*' did not finish within")


# -- FLEECE_KDF_TIME ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("1", 0.001), ("250", 0.25), ("500", 0.5),
                                               ("60000", 60.0), (" 12 ", 0.012)])
def test_kdf_seconds(text: str, seconds: float) -> None:
    assert kdf_seconds({"FLEECE_KDF_TIME": text}) == seconds


def test_kdf_seconds_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kdf_seconds({}) == 0.5
    assert kdf_seconds({}, default=2.0) == 2.0
    assert kdf_seconds({"FLEECE_KDF_TIME": ""}, default=1.5) == 1.5
    monkeypatch.setenv("FLEECE_KDF_TIME", "125")
    assert kdf_seconds() == 0.125
    monkeypatch.delenv("FLEECE_KDF_TIME")
    assert kdf_seconds() == 0.5


@pytest.mark.parametrize("text", ["-1", "1.5", "0.5", "abc", "60001", "1e3", "١٢", "+5", "5ms", " "])
def test_kdf_seconds_refuses_anything_but_whole_milliseconds(text: str) -> None:
    with pytest.raises(UsageError, match="FLEECE_KDF_TIME=.* must be whole milliseconds from 0 to 60000"):
        kdf_seconds({"FLEECE_KDF_TIME": text})
