"""A fault-injecting HTTP reverse proxy in front of the real S3 server (Ceph RGW).

Clients use the proxy's address as their S3 endpoint. For every request, with probability *rate*, the
proxy answers 500 InternalError or 503 SlowDown itself, or resets the TCP connection — before
forwarding, or after forwarding the request and relaying only part of the response body (a download cut
mid-way). Everything else is relayed byte for byte. What it did is counted in :attr:`injected`.

It understands just enough HTTP/1.1 for S3 traffic: Content-Length and chunked bodies, HEAD, 1xx/204/304,
and ``Expect: 100-continue`` (which it answers itself).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections import Counter


FAULTS = ("500", "reset-mid-response", "503", "reset-before")


class _Closed(Exception):
    pass


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise _Closed
        self.buf += data

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def read_body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                line = self.read_line()
                out += line
                size = int(line.split(b";")[0].strip(), 16)
                out += self.read_exact(size + 2)
                if size == 0:
                    return out
        return self.read_exact(int(headers.get("content-length", "0")))


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    sock.close()


class FaultyProxy:
    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 1) -> None:
        host, port = upstream.split("//", 1)[-1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.rng.random() >= self.rate:
                return None
            fault = FAULTS[sum(self.injected.values()) % len(FAULTS)]  # every kind, in turn
            self.injected[fault] += 1
            return fault

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        c = _Conn(client)
        try:
            while True:
                head = c.read_head()
                request_line, fields = _headers(head)
                if fields.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:"))
                body = c.read_body(fields)
                fault = self._decide()
                if fault in ("500", "503"):
                    code, reason, name = (("500", "Internal Server Error", "InternalError") if fault == "500"
                                          else ("503", "Slow Down", "SlowDown"))
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code>'
                           f"<Message>injected by the test proxy</Message></Error>").encode()
                    client.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n"
                                   f"Content-Length: {len(xml)}\r\n\r\n".encode() + xml)
                    continue
                if fault == "reset-before":
                    _reset(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    u = _Conn(upstream)
                upstream.sendall(head + body)
                while True:  # skip interim 1xx responses
                    rhead = u.read_head()
                    status_line, rfields = _headers(rhead)
                    status = int(status_line.split()[1])
                    if status >= 200:
                        break
                    client.sendall(rhead)
                no_body = request_line.startswith("HEAD ") or status in (204, 304)
                rbody = b"" if no_body else u.read_body(rfields)
                if fault == "reset-mid-response":
                    client.sendall(rhead + rbody[: len(rbody) // 2])
                    _reset(client)
                    return
                client.sendall(rhead + rbody)
        except (_Closed, OSError):
            pass
        finally:
            try:
                client.close()
            except OSError:
                pass
            if upstream is not None:
                upstream.close()
