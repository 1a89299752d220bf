"""The password prompt: only on a terminal, twice for a new repository, never in a script.

A real pseudo-terminal becomes the controlling terminal of ``fleece`` through ``setsid -c`` (getpass
reads /dev/tty), so this is what a person at a shell sees.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from checks import FLEECE, fleece

NO_PASSWORD = {k: v for k, v in os.environ.items() if not k.startswith("FLEECE_PASSWORD")}


def on_terminal(args: list[str], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run fleece on a fresh pty, typing each answer after each prompt that ends with ': '."""
    master, slave = pty.openpty()
    p = subprocess.Popen(["setsid", "-c", FLEECE, *args], stdin=slave, stdout=slave, stderr=slave,
                         env=NO_PASSWORD, close_fds=True)
    os.close(slave)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if pending and seen.rstrip().endswith(b":"):
                    os.write(master, pending.pop(0).encode() + b"\n")
                    seen += b"<typed>"
            elif p.poll() is not None:
                break
        return p.wait(timeout=max(1.0, deadline - time.monotonic())), seen.decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_prompt_creates_and_opens_an_encrypted_repository(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    code, out = on_terminal(["init", "--repo", repo], ["typed secret", "typed secret"])
    assert code == 0, out
    assert "new password for" in out and "again:" in out and "encrypted" in out, out
    assert "typed secret" not in out  # no echo
    code, out = on_terminal(["key", "list", "--repo", repo], ["typed secret"])
    assert code == 0 and "password for" in out and "passphrase full" in out, out
    code, out = on_terminal(["list", "--repo", repo], ["not it"])
    assert code == 1 and "wrong password (from prompt)" in out, out
    # the prompt's password is an ordinary slot: a script opens it with the same password
    p = fleece("list", "--repo", repo, "--json", env=dict(NO_PASSWORD, FLEECE_PASSWORD="typed secret"))
    assert p.returncode == 0 and json.loads(p.stdout)["points"] == [], p.stderr


def test_two_different_passwords_create_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code, out = on_terminal(["init", "--repo", str(repo)], ["one", "two"])
    assert code == 2 and "the two passwords differ" in out, out
    assert not repo.exists() or not any(repo.iterdir())


def test_no_terminal_no_prompt(tmp_path: Path) -> None:
    """A script without a password gets one line naming the variables, at once — never a prompt."""
    p = subprocess.run([FLEECE, "init", "--repo", str(tmp_path / "repo")], env=NO_PASSWORD, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "FLEECE_PASSWORD" in p.stderr and "--no-encryption" in p.stderr and "password for" not in p.stderr
    assert not (tmp_path / "repo").exists()
