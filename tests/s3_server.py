"""Start/stop a throw-away Ceph RADOS Gateway (a real S3 server) for tests, via tools/s3-server.

    info = start(tmp_path / "rgw")   # {"endpoint", "access_key", "secret_key", "region", "dir", "backend", "pids"}
    ...
    stop(tmp_path / "rgw")

Stdlib only. The daemons run detached; always call stop() (e.g. in a fixture's finally).
"""
import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "s3-server"


def start(dir: Path, backend: str = "memstore", timeout: float = 120.0) -> dict:
    """Start (or restart with its data, or just report) the server in dir; returns its JSON."""
    p = subprocess.run([str(SCRIPT), "start", "--dir", str(dir), "--backend", backend,
                        "--timeout", str(timeout)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 90)
    if p.returncode != 0:
        raise RuntimeError(f"tools/s3-server start failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def stop(dir: Path) -> None:
    """Stop the server in dir (rgw, osd, mon); leaves dir itself for the caller to remove."""
    p = subprocess.run([str(SCRIPT), "stop", "--dir", str(dir)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"tools/s3-server stop failed: {p.stderr.strip()}")
