"""Real, compressible benchmark data: files from /usr, concatenated once and cached.

Benchmarks must run on data like a VM disk holds (binaries, libraries, text), not on zeros or random
bytes, or compression numbers mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("FLEECE_BENCH_DIR", "/var/tmp/fleece-bench"))


def usr_files(roots: tuple[str, ...] = ("/usr/lib", "/usr/share", "/usr/bin", "/usr/libexec")):
    """Regular files under *roots* in a stable order."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                if os.path.isfile(p) and not os.path.islink(p):
                    yield p


def corpus(size: int) -> Path:
    """A file of *size* bytes of concatenated /usr files (built on first use, then reused)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"corpus-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "wb") as out:
        while written < size:
            for p in usr_files():
                try:
                    data = Path(p).read_bytes()
                except OSError:
                    continue
                data = data[: size - written]
                out.write(data)
                written += len(data)
                if written >= size:
                    break
    os.replace(tmp, path)
    return path
