"""``--config FILE`` (fleece/config.py) and the systemd units of contrib/systemd, through ``fleece.cli.main``.

No VM: what a command would run with is caught by replacing its ``run`` (the parse is the real one, the
whole of ``main`` runs), and the end-to-end cases are ``init``, ``list``, ``prune`` on a local repository
named only by the file.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

from fleece import cli
from fleece.commands import COMMANDS
from fleece.repository.ratelimit import parse_rate

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
FLEECE_BIN = ROOT / ".venv" / "bin" / "fleece"


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() sets up logging on the captured stderr, a SIGTERM handler and gc.freeze(): undo them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    signal.signal(signal.SIGTERM, sigterm)
    gc.unfreeze()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, argparse.Namespace]:
    """Every command's ``run`` replaced by one that records its arguments (and exits 0)."""
    got: dict[str, argparse.Namespace] = {}
    for name, (help_text, add_arguments, _) in list(COMMANDS.items()):
        def record(args: argparse.Namespace, name: str = name) -> int:
            got[name] = args
            return 0

        monkeypatch.setitem(COMMANDS, name, (help_text, add_arguments, record))
    return got


def config(tmp_path: Path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def one_error(err: str) -> str:
    """The single ``fleece: error:`` line of a usage failure (argparse's usage text aside)."""
    lines = [line for line in err.splitlines() if line.startswith("fleece: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- merging ---------------------------------------------------------------------------------------------

def test_file_supplies_required_options(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'repo = "/srv/r"\n[forget]\nvm = "web1"\nkeep-daily = 7\n')
    assert run(capsys, "list", "--config", cfg)[0] == 0
    assert seen["list"].repo == "/srv/r"
    assert run(capsys, "forget", "--config", cfg)[0] == 0
    assert (seen["forget"].repo, seen["forget"].vm, seen["forget"].keep_daily) == ("/srv/r", "web1", 7)
    assert run(capsys, "key", "list", "--config", cfg)[0] == 0  # the actions of `fleece key` too
    assert seen["key"].repo == "/srv/r"


def test_required_options_are_still_required(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'workers = 3\n')
    code, out, err = run(capsys, "backup", "--config", cfg, "--qmp", "/run/x.sock")
    assert code == 2 and not seen
    assert one_error(err) == "fleece: error: the following arguments are required: --repo"
    code, _, err = run(capsys, "forget", "--config", config(tmp_path, 'repo = "/r"\n'), "--keep-daily", "1")
    assert code == 2 and one_error(err) == "fleece: error: the following arguments are required: --vm"
    # a required exclusive group (serve --socket | --port) is satisfied by either
    code, _, err = run(capsys, "serve", "--config", cfg, "--repo", "/r", "--vm", "a")
    assert code == 2 and "one of the arguments --socket --port is required" in one_error(err)
    assert run(capsys, "serve", "--config", config(tmp_path, 'socket = "/run/s.sock"\n'), "--repo", "/r",
               "--vm", "a")[0] == 0
    assert str(seen["serve"].socket) == "/run/s.sock"
    both = config(tmp_path, 'socket = "/run/s.sock"\nport = 10809\n', "both.toml")
    code, _, err = run(capsys, "serve", "--config", both, "--repo", "/r", "--vm", "a")
    assert code == 2 and one_error(err) == f"fleece: error: {both}: keys 'port' and 'socket' exclude each other: give one"


def test_command_line_wins(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'repo = "/file"\nworkers = 3\ntag = ["a", "b"]\nnote = "from file"\n')
    assert run(capsys, "backup", "--config", cfg, "--qmp", "q", "--repo", "/cli", "--workers", "5",
               "--tag", "c")[0] == 0
    a = seen["backup"]
    assert (a.repo, a.workers, a.tag, a.note) == ("/cli", 5, ["c"], "from file")  # a list is replaced, not added to
    # the same value as the default, given on the command line, still wins over the file
    assert run(capsys, "backup", "--config", cfg, "--qmp", "q", "--workers", "4")[0] == 0
    assert seen["backup"].workers == 4
    # an exclusive group: the command line's member wins, the file's other member is dropped
    cfg = config(tmp_path, 'repo = "/r"\nvm = "a"\nsocket = "/run/s.sock"\n', "serve.toml")
    assert run(capsys, "serve", "--config", cfg, "--port", "10809")[0] == 0
    assert (seen["serve"].port, seen["serve"].socket) == (10809, None)


def test_command_table_overrides_top_level(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'repo = "/r"\nworkers = 3\nkeep-daily = 9\n'
                           '[backup]\nworkers = 2\nrepo = "/backup-only"\n[forget]\nvm = "a"\n')
    assert run(capsys, "backup", "--config", cfg, "--qmp", "q")[0] == 0  # keep-daily (forget's) is skipped
    assert (seen["backup"].workers, seen["backup"].repo) == (2, "/backup-only")
    assert run(capsys, "verify", "--config", cfg)[0] == 0
    assert (seen["verify"].workers, seen["verify"].repo) == (3, "/r")
    assert run(capsys, "forget", "--config", cfg)[0] == 0
    assert (seen["forget"].keep_daily, seen["forget"].vm) == (9, "a")


def test_values_like_the_command_line(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'repo = "/r"\ntag = ["nightly", "db"]\ndisk = "vda"\nbwlimit = "20M"\n'
                           'full = ["vdb", "vdc"]\nadopt = true\ncreate-bucket = false\njson = true\n'
                           'verbose = 2\naudit-sample = "8"\n')
    assert run(capsys, "backup", "--config", cfg, "--qmp", "q")[0] == 0
    a = seen["backup"]
    assert a.tag == ["nightly", "db"] and a.disk == ["vda"]  # one value for a repeatable option: a list of one
    assert a.bwlimit == parse_rate("20M") and a.full == ["vdb", "vdc"] and a.audit_sample == 8
    assert (a.adopt, a.create_bucket, a.json, a.verbose) == (True, False, True, 2)
    assert run(capsys, "backup", "--config", config(tmp_path, 'repo = "/r"\nfull = true\n'), "--qmp", "q")[0] == 0
    assert seen["backup"].full == [None]  # as a bare --full: every disk
    cfg = config(tmp_path, 'repo = "/r"\nvm = "a"\nkeep-last = 2\ntimezone = "Europe/Berlin"\ngrace = "2d"\n'
                           'max-unused = "10%"\nkeep-tag = ["keep"]\n')
    assert run(capsys, "forget", "--config", cfg)[0] == 0
    f = seen["forget"]
    assert (str(f.timezone), f.grace, f.max_unused, f.keep_tag, f.keep_last) == ("Europe/Berlin", 172800.0, 0.1,
                                                                                 ["keep"], 2)
    cfg = config(tmp_path, 'repo = "/r"\nvm = "a"\nout = "/restore"\nformat = "raw"\nflat = true\nmode = "0640"\n')
    assert run(capsys, "restore", "--config", cfg)[0] == 0
    r = seen["restore"]
    assert (r.out, r.format, r.flat, r.mode, r.point) == ("/restore", "raw", True, 0o640, "latest")


# -- errors: one line, exit 2, the file and the key named --------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("workers = 0", "key 'workers' (--workers): '0' must be at least 1"),
    ("[backup]\nworkers = 9999", "key 'workers' (--workers): '9999' must be at most"),
    ("bwlimit = \"fast\"", "key 'bwlimit' (--bwlimit): "),
    ("tag = [\"ok\", \"\"]", "key 'tag' (--tag): "),
    ("workers = true", "key 'workers' (--workers): takes a value, not true"),
    ("adopt = \"yes\"", "key 'adopt' (--adopt): is a flag: write true or false"),
    ("vm = [\"a\", \"b\"]", "key 'vm' (--vm): is a list: write a string or a number (the option is not repeatable)"),
    ("note = 2026-01-01", "key 'note' (--note): is date: write a string or a number"),
    ("verbose = -1", "key 'verbose' (--verbose): is a count"),
])
def test_bad_value(tmp_path, capsys, seen, text, message):
    cfg = config(tmp_path, 'repo = "/r"\n' + text + "\n")
    for extra in ((), ("--json",)):
        code, out, err = run(capsys, "backup", "--config", cfg, "--qmp", "q", *extra)
        assert code == 2 and not seen
        assert err.count("\n") == 1, err  # one line, no usage text
        line = one_error(err)
        assert line.startswith(f"fleece: error: {cfg}: {message}"), line
        if extra:
            doc = json.loads(out)
            assert doc["error"]["kind"] == "usage" and doc["error"]["exit"] == 2
            assert doc["error"]["message"] == line.removeprefix("fleece: error: ")
        else:
            assert out == ""


def test_bad_value_for_another_command_in_its_table_is_its_business(tmp_path, capsys, seen):
    # values are checked for the command that runs; names are checked everywhere (next test)
    cfg = config(tmp_path, 'repo = "/r"\n[forget]\nkeep-daily = "lots"\n')
    assert run(capsys, "list", "--config", cfg)[0] == 0
    code, _, err = run(capsys, "forget", "--config", cfg, "--vm", "a")
    assert code == 2 and f"{cfg}: key 'keep-daily' (--keep-daily): 'lots' is not a count" in one_error(err)


@pytest.mark.parametrize("text, message", [
    ("wokers = 4", "unknown key 'wokers' (did you mean 'workers'?): no fleece command has --wokers"),
    ("password_file = \"/p\"", "unknown key 'password_file' (did you mean 'password-file'?)"),
    ("[backup]\nkeep-daily = 7", "unknown key 'keep-daily' in [backup]: backup has no --keep-daily"),
    ("[forget]\nkeep-dialy = 7", "unknown key 'keep-dialy' in [forget] (did you mean 'keep-daily'?)"),
    ("[bakup]\nworkers = 2", "unknown table [bakup] (did you mean 'backup'?): tables are named for commands"),
    ("config = \"/other.toml\"", "key 'config' is not allowed: a config cannot name another config"),
    ("help = true", "unknown key 'help'"),
    ("backup = 1", "unknown key 'backup'"),
])
def test_unknown_key(tmp_path, capsys, seen, text, message):
    cfg = config(tmp_path, 'repo = "/r"\n' + text + "\n")
    code, out, err = run(capsys, "backup", "--config", cfg, "--qmp", "q")
    assert code == 2 and not seen and out == ""
    assert err.count("\n") == 1 and one_error(err).startswith(f"fleece: error: {cfg}: {message}"), err


def test_unreadable_or_not_toml(tmp_path, capsys, seen):
    cases = {
        str(tmp_path / "missing.toml"): f"cannot read config {tmp_path / 'missing.toml'}: No such file or directory",
        str(tmp_path): f"cannot read config {tmp_path}: Is a directory",
        config(tmp_path, 'repo = "/r"\nworkers 4\n', "broken.toml"):
            f"config {tmp_path / 'broken.toml'} is not valid TOML: Expected '=' after a key in a key/value pair "
            "(at line 2, column 9)",
    }
    latin = tmp_path / "latin1.toml"
    latin.write_bytes(b'note = "caf\xe9"\n')
    cases[str(latin)] = f"config {latin} is not valid TOML: "
    for path, message in cases.items():
        for extra in ((), ("--json",)):
            code, out, err = run(capsys, "list", "--config", path, *extra)
            assert code == 2 and not seen
            assert err.count("\n") == 1 and one_error(err).startswith(f"fleece: error: {message}"), err
            if extra:
                assert json.loads(out)["error"]["kind"] == "usage"


def test_world_writable_warning(tmp_path, capsys, seen):
    cfg = config(tmp_path, 'repo = "/r"\n')
    code, _, err = run(capsys, "list", "--config", cfg)
    assert code == 0 and err == ""
    os.chmod(cfg, 0o666)
    code, _, err = run(capsys, "list", "--config", cfg)
    assert code == 0 and seen["list"].repo == "/r"
    assert err == (f"fleece: warning: config {cfg} is writable by every user: anyone could change what is backed "
                   f"up and where to (chmod o-w {cfg})\n")
    os.chmod(cfg, 0o664)  # group-writable: the group's business
    assert run(capsys, "list", "--config", cfg)[2] == ""


def test_without_config_nothing_changes(tmp_path, capsys, seen):
    code, _, err = run(capsys, "list")
    assert code == 2 and one_error(err) == "fleece: error: the following arguments are required: --repo"
    assert err.startswith("usage: fleece list [-h] --repo REPO")
    # a command line that is wrong anyway is reported as without the file (the file is not even read)
    code, _, err = run(capsys, "list", "--config", str(tmp_path / "missing.toml"), "--bogus")
    assert code == 2 and one_error(err) == "fleece: error: unrecognized arguments: --bogus"
    code, _, err = run(capsys, "backup", "--config", str(tmp_path / "missing.toml"), "--workers", "0")
    assert code == 2 and one_error(err) == "fleece: error: argument --workers: '0' must be at least 1"
    assert err.startswith("usage: fleece backup [-h]") and "--repo REPO" in err  # the real parser's usage
    with pytest.raises(SystemExit) as exit_:
        cli.main(["backup", "--config", "x.toml", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: fleece backup") and "--repo REPO" in out
    assert "--config FILE" in out and "[--repo" not in out  # the real parser's help, once
    assert out.count("usage:") == 1


# -- end to end: a local repository named only by the file -------------------------------------------------

def test_init_list_prune_from_the_file(tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    password = tmp_path / "password"
    password.write_text("config test password\n")
    password.chmod(0o600)
    for var in ("FLEECE_PASSWORD", "FLEECE_PASSWORD_FILE", "FLEECE_PASSWORD_COMMAND", "FLEECE_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    cfg = config(tmp_path, f'repo = "{repo}"\npassword-file = "{password}"\nkeep-daily = 7\n'
                           '[init]\ncompression-level = 5\n[prune]\ngrace = "0"\ndry-run = true\n')
    code, out, err = run(capsys, "init", "--config", cfg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["repo"].endswith(str(repo)) and doc["created"] and doc["encrypted"]
    assert doc["compression"]["level"] == 5
    code, out, err = run(capsys, "list", "--config", cfg, "--json")
    assert code == 0, err
    assert json.loads(out) == {"repo": str(repo), "points": [], "damaged": {}}
    code, out, err = run(capsys, "prune", "--config", cfg, "--json")
    assert code == 0, err
    assert json.loads(out)["dry_run"] is True
    # the password really came from the file's password-file
    password.write_text("another password\n")
    code, out, err = run(capsys, "list", "--config", cfg, "--json")
    assert code == 1 and json.loads(out)["error"]["exit"] == 1


# -- contrib/systemd -------------------------------------------------------------------------------------

def _keys(path: Path) -> dict[str, set[str]]:
    doc = tomllib.loads(path.read_text())
    out: dict[str, set[str]] = {"": {k for k, v in doc.items() if not isinstance(v, dict)}}
    out.update({k: set(v) for k, v in doc.items() if isinstance(v, dict)})
    return out


def test_examples_are_valid(capsys, seen):
    # the QEMU example, as the units run it
    qemu = str(UNITS / "example-qemu.toml")
    assert run(capsys, "backup", "--config", qemu, "--json")[0] == 0
    b = seen["backup"]
    assert (b.qmp, b.repo, b.vm, b.tag, b.json) == ("/run/web1-fleece.sock", "/srv/backups", "web1", ["nightly"], True)
    assert run(capsys, "forget", "--config", qemu, "--json")[0] == 0
    assert (seen["forget"].vm, seen["forget"].keep_daily) == ("web1", 7)
    for command in ("list", "prune", "verify"):
        assert run(capsys, command, "--config", qemu)[0] == 0, command
    # the libvirt example: every running domain of --connect
    libvirt = str(UNITS / "example.toml")
    assert run(capsys, "backup", "--config", libvirt)[0] == 0
    b = seen["backup"]
    assert (b.all, b.connect, b.repo, b.workers, b.tag) == (True, "qemu:///system", "s3://backups/fleece", 4,
                                                            ["nightly"])
    for command in ("forget", "prune", "list"):
        code, _, err = run(capsys, command, "--config", libvirt, *(["--vm", "a"] if command == "forget" else []))
        assert code == 0, err


def _instantiate(dest: Path, instance: str) -> list[Path]:
    """The four units as instances, ExecStart pointing at this checkout's fleece (verify checks it exists)."""
    units = []
    for template in ("fleece@.service", "fleece@.timer", "fleece-forget@.service", "fleece-forget@.timer"):
        text = (UNITS / template).read_text().replace("/usr/local/bin/fleece", str(FLEECE_BIN))
        path = dest / template.replace("@.", f"@{instance}.")
        path.write_text(text)
        units.append(path)
    return units


def test_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = _instantiate(tmp_path, "web1")
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    problems = [line for line in p.stderr.splitlines()
                if "fleece" in line and "Failed to read $container" not in line]
    assert p.returncode == 0 and not problems, p.stderr
    service = (UNITS / "fleece@.service").read_text()
    assert "ExecStart=/usr/local/bin/fleece backup --config /etc/fleece/%i.toml --json\n" in service
    assert re.search(r"^Type=oneshot$", service, re.M) and not re.search(r"^Restart=", service, re.M)
    assert re.search(r"^PrivateTmp=no$", service, re.M) and re.search(r"^UMask=0077$", service, re.M)
    timer = (UNITS / "fleece@.timer").read_text()
    assert re.search(r"^Persistent=true$", timer, re.M) and re.search(r"^RandomizedDelaySec=", timer, re.M)


def _exec_start(unit: Path, instance: str) -> str:
    """The unit's ExecStart as the shell gets it: systemd's specifiers and $$ resolved."""
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    cmd = line.removeprefix("ExecStart=").replace("%i", instance).replace("$$", "$")
    return cmd.replace("/usr/local/bin/fleece", str(FLEECE_BIN))


def test_forget_unit_runs(tmp_path, capsys, monkeypatch):
    """fleece-forget@'s shell line, against an empty local repository: list, no VM to forget, one prune."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (the forget unit needs it)")
    repo = tmp_path / "repo"
    cfg = config(tmp_path, f'repo = "{repo}"\n[forget]\nkeep-daily = 7\n[prune]\ngrace = "1h"\n')
    assert run(capsys, "init", "--config", cfg)[0] == 0
    cmd = _exec_start(UNITS / "fleece-forget@.service", "job").replace("/etc/fleece/job.toml", cfg)
    argv = __import__("shlex").split(cmd)
    assert argv[:2] == ["/bin/sh", "-c"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dry_run"] is False  # the prune's document
    # a broken config fails the unit (exit 1), with one error line per step
    bad = config(tmp_path, f'repo = "{repo}"\n[forget]\nkeep-dialy = 7\n', "job.toml")
    p = subprocess.run(__import__("shlex").split(cmd.replace(cfg, bad)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "unknown key 'keep-dialy' in [forget]" in p.stderr
