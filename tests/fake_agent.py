"""A small qemu-guest-agent stand-in on a unix socket, for the exact tests of exporter/agent.py.

It speaks the agent's dialect (one JSON command per line, a 0xFF byte resets the parser, the answer to
``guest-sync-delimited`` is prefixed with 0xFF) and misbehaves on request: *hang* holds a command's answer
until :meth:`FakeAgent.release`, *refuse* answers it with an error, *drop* closes the connection when it
arrives. Every command it receives is recorded in :attr:`FakeAgent.log`; ``frozen`` is its freeze state.
The real agent in a real guest is tests/test_quiesce.py's job; this one makes the failure paths exact.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path


class FakeAgent:
    def __init__(self, path: Path, filesystems: int = 2) -> None:
        self.path = str(path)
        self.filesystems = filesystems
        self.frozen = False
        self.log: list[str] = []
        self.hang: set[str] = set()
        self.refuse: set[str] = set()
        self.drop: set[str] = set()
        self.silent = False  # accept connections, never answer (no agent running in the guest)
        self._released = threading.Event()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(4)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let held (*hang*) commands answer now."""
        self._released.set()

    def close(self) -> None:
        self._stop = True
        self._released.set()
        try:
            c = socket.socket(socket.AF_UNIX)
            c.connect(self.path)
            c.close()
        except OSError:
            pass
        self._thread.join(5)
        self._srv.close()

    def _serve(self) -> None:
        while not self._stop:
            conn, _ = self._srv.accept()
            if self._stop:
                conn.close()
                return
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.split(b"\xff")[-1].strip()  # 0xFF resets the parser
                if not line:
                    continue
                if self.silent:
                    continue
                cmd = json.loads(line)
                name = cmd["execute"]
                self.log.append(name)
                if name in self.drop:
                    self.drop.discard(name)
                    return
                if name in self.hang:
                    self._released.wait()
                    self.hang.discard(name)
                if name in self.refuse:
                    conn.sendall(json.dumps({"error": {"class": "GenericError",
                                                       "desc": f"{name} refused by the fake"}}).encode() + b"\n")
                    continue
                conn.sendall(self._answer(name, cmd.get("arguments") or {}))

    def _answer(self, name: str, args: dict) -> bytes:
        if name == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
        if name == "guest-fsfreeze-status":
            ret: object = "frozen" if self.frozen else "thawed"
        elif name == "guest-fsfreeze-freeze":
            self.frozen = True
            ret = self.filesystems
        elif name == "guest-fsfreeze-thaw":
            ret = self.filesystems if self.frozen else 0
            self.frozen = False
        else:
            return json.dumps({"error": {"class": "CommandNotFound", "desc": name}}).encode() + b"\n"
        return json.dumps({"return": ret}).encode() + b"\n"
