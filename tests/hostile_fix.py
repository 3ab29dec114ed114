"""Hostile HTTP servers on loopback for the attacker tests (issue 16): a registry that answers
what the test scripts, over plain HTTP or over HTTPS with a certificate made here, and
records every request it gets (with its headers and body), so a test can tell which
credentials went where.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import pathlib
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.registry_fix import PASSWORD, self_signed, serving
from tests.reliability import tally

Handler = http.server.BaseHTTPRequestHandler


@dataclass(frozen=True)
class Seen:
    """One request a hostile server got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def carries_secret(self) -> bool:
        """Whether the request carries any credential: an Authorization header, or the
        password anywhere in its path or body."""
        return (
            "authorization" in self.headers
            or PASSWORD in self.path
            or PASSWORD.encode() in self.body
        )


@dataclass
class Server:
    """A server on 127.0.0.1 answering every request with `answer(handler, seen)`."""

    scheme: str
    host: str
    answer: Callable[[Handler, Seen], None] = lambda h, s: reply(h, 404, b"")
    seen: list[Seen] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    def ref(self, path: str) -> str:
        return f"{self.host}/{path}"


def make_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed server certificate for 127.0.0.1, ::1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = self_signed(key, "pyctrd hostile registry", names)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def serve(tls: tuple[pathlib.Path, pathlib.Path] | None = None) -> Iterator[Server]:
    """A hostile server, HTTPS with the certificate and key `tls`, else plain HTTP."""
    state = Server("https" if tls else "http", "")

    class Handle(Handler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = Seen(self.command, self.path, headers, body)
            state.seen.append(seen)
            state.answer(self, seen)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

    with serving(Handle, tls) as server:
        state.host = f"127.0.0.1:{server.server_address[1]}"
        yield state


@pytest.fixture
def certificate(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[pathlib.Path, pathlib.Path]:
    """A server certificate the client trusts (`SSL_CERT_FILE`, which httpx reads)."""
    directory = tmp_path / "tls"
    directory.mkdir()
    cert, key = make_certificate(directory)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return cert, key


def reply(
    handler: Handler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    """Answers with `body` (not sent to a HEAD) and `headers`."""
    handler.send_response(status)
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    for key, value in all_headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def error_body(message: str) -> bytes:
    return json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()


def drip(handler: Handler, body: bytes, interval: float, headers: dict[str, str]) -> None:
    """Sends `body` one byte every `interval` seconds (stops when the client goes away)."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    with contextlib.suppress(OSError):
        for i in range(len(body)):
            handler.wfile.write(body[i : i + 1])
            handler.wfile.flush()
            time.sleep(interval)


def bomb(encoding: str, size: int) -> bytes:
    """`size` (a multiple of 1 MiB) zero bytes compressed with `encoding` (gzip or zstd)."""
    block = bytes(1 << 20)
    if encoding == "gzip":
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)
        return b"".join([*(gz.compress(block) for _ in range(size >> 20)), gz.flush()])
    zs = zstandard.ZstdCompressor(level=19).compressobj()
    return b"".join([*(zs.compress(block) for _ in range(size >> 20)), zs.flush()])


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds, afterwards, the peak of memory Python allocated inside."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def refused(ok: bool, detail: object = None) -> None:
    """Counts one attack in the reliability suite's security category, then asserts that
    it was refused."""
    tally.add("security checks", attacks=1, refused=int(ok))
    assert ok, detail
