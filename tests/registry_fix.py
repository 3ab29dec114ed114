"""pytest plugin: real distribution registries (Debian's `docker-registry`) on 127.0.0.1, a
token server for them, a scripted registry that misbehaves on purpose, and a second
containerd standing for another host.

The registry runs three ways, each a session fixture: `open_registry` (no auth),
`basic_registry` (htpasswd, bcrypt) and `token_registry` (tokens from `TokenServer`: RS256
JWTs whose `x5c` header carries the self-signed certificate the registry trusts).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyctrd_cache import Manager
from pyctrd_cache.client import Client
from pyctrd_cache.embedded import EmbeddedContainerd
from tests.fix_containerd import INSTALLED, SNAPSHOTTER, Daemon, clean_namespace

REGISTRY_BINARY = "/usr/bin/docker-registry"
SERVICE = "pyctrd-test-registry"
ISSUER = "pyctrd-test-issuer"
USER, PASSWORD = "alice", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serving(
    handler: type[http.server.BaseHTTPRequestHandler],
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
) -> Iterator[_Server]:
    """A server on 127.0.0.1, over HTTPS with the certificate and key `tls` if given."""
    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# The token server.


def self_signed(
    key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A self-signed CA certificate of `key`, valid from an hour ago for a day, for the
    subject alternative `names` if any."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


@dataclass
class TokenServer:
    """Issues registry tokens: the user gets every action asked for, anonymous callers get
    nothing. `requests` records (method, grant) of every token request; `post` False
    answers the OAuth2 POST form with 405, as token servers without it do."""

    cert_path: pathlib.Path
    realm: str = ""
    post: bool = True
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self_signed(self._key, "pyctrd test token issuer")
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def token(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if subject and kind == "repository" and name:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, document: object) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _grant(self, user: str, password: str, scopes: list[str]) -> None:
                if user and (user, password) != (USER, PASSWORD):
                    self._answer(401, {"error": "invalid credentials"})
                    return
                token = server.token(user, [s for scope in scopes for s in scope.split()])
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300})

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = password = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    decoded = base64.b64decode(header[6:]).decode()
                    user, _, password = decoded.partition(":")
                server.requests.append(("GET", "basic" if user else "anonymous"))
                self._grant(user, password, query.get("scope", []))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                grant = form.get("grant_type", [""])[0]
                server.requests.append(("POST", grant))
                if not server.post:
                    self._answer(405, {"error": "method not allowed"})
                    return
                if grant != "password":
                    self._answer(400, {"error": "unsupported_grant_type"})
                    return
                self._grant(
                    form.get("username", [""])[0],
                    form.get("password", [""])[0],
                    form.get("scope", []),
                )

        return Handler


# The registry.


@dataclass
class Registry:
    """A running `docker-registry` on 127.0.0.1."""

    host: str
    auth: str
    tokens: TokenServer | None = None

    def ref(self, path: str) -> str:
        return f"{self.host}/{path}"

    def url(self, path: str) -> str:
        return f"http://{self.host}/v2/{path}"


def make_tls(work: pathlib.Path, ip: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A test certificate authority and a server certificate for `ip` it signed: the paths of
    the CA's certificate, the server's certificate and the server's key (PEM)."""
    import ipaddress

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyctrd test CA")])
    ca = (
        build("pyctrd test CA", ca_key)
        .issuer_name(ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        build(ip, key)
        .issuer_name(ca_name)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (work / "ca.pem", work / "server.pem", work / "server-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _start_registry(
    work: pathlib.Path,
    auth: str,
    tokens: TokenServer | None = None,
    *,
    ip: str = "127.0.0.1",
    tls: tuple[pathlib.Path, pathlib.Path] | None = None,
) -> tuple[subprocess.Popen[bytes], Registry]:
    port = free_port()
    http: dict[str, object] = {"addr": f"{ip}:{port}", "secret": uuid.uuid4().hex}
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(work / "storage")}},
        "http": http,
    }
    if auth == "htpasswd":
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        (work / "htpasswd").write_text(f"{USER}:{hashed}\n")
        config["auth"] = {"htpasswd": {"realm": "pyctrd-test", "path": str(work / "htpasswd")}}
    elif auth == "token":
        assert tokens is not None
        config["auth"] = {
            "token": {
                "realm": tokens.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(tokens.cert_path),
            }
        }
    # JSON is YAML: the registry reads it as its config.
    (work / "config.yml").write_text(json.dumps(config))
    log = open(work / "registry.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(work / "config.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    registry = Registry(f"{ip}:{port}", auth, tokens)
    scheme = "https" if tls is not None else "http"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{scheme}://{registry.host}/v2/", timeout=2, verify=False)
            if answer.status_code in (200, 401):
                return process, registry
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"docker-registry did not start: {(work / 'registry.log').read_text()[-2000:]}"
            )
        time.sleep(0.1)


@contextlib.contextmanager
def _registry(auth: str) -> Iterator[Registry]:
    if not os.path.exists(REGISTRY_BINARY):
        pytest.fail(f"{REGISTRY_BINARY} is missing: scripts/setup installs it")
    work = pathlib.Path(tempfile.mkdtemp(prefix="registry-", dir="/tmp"))
    tokens = None
    with contextlib.ExitStack() as stack:
        if auth == "token":
            tokens = TokenServer(work / "token.pem")
            server = stack.enter_context(serving(tokens.handler()))
            tokens.realm = f"http://127.0.0.1:{server.server_address[1]}/token"
        process, registry = _start_registry(work, auth, tokens)
        try:
            yield registry
        finally:
            stop(process)
            shutil.rmtree(work, ignore_errors=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def open_registry() -> Iterator[Registry]:
    with _registry("none") as registry:
        yield registry


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[Registry]:
    with _registry("htpasswd") as registry:
        yield registry


@dataclass
class TLSRegistry:
    """An open registry over HTTPS with a certificate from a test CA (`ca_file`)."""

    registry: Registry
    ca_file: pathlib.Path


@pytest.fixture(scope="session")
def tls_registry() -> Iterator[TLSRegistry]:
    if not os.path.exists(REGISTRY_BINARY):
        pytest.fail("needs Debian's docker-registry (scripts/setup installs it)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="registry-tls-", dir="/tmp"))
    ca, cert, key = make_tls(work, "127.0.0.1")
    process, registry = _start_registry(work, "none", tls=(cert, key))
    try:
        yield TLSRegistry(registry, ca)
    finally:
        stop(process)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def elsewhere_registry() -> Iterator[Registry]:
    """An open plain-HTTP registry on 127.0.0.2: loopback for the network, but not one of the
    host names the library treats as loopback, so it stands for another host."""
    if not os.path.exists(REGISTRY_BINARY):
        pytest.fail("needs Debian's docker-registry (scripts/setup installs it)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="registry-2-", dir="/tmp"))
    process, registry = _start_registry(work, "none", ip="127.0.0.2")
    try:
        yield registry
    finally:
        stop(process)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def token_registry() -> Iterator[Registry]:
    with _registry("token") as registry:
        yield registry


# A registry that misbehaves on purpose.

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class ScriptedRegistry:
    """Answers the paths in `routes` (after `/v2/`) with their functions, anything else
    with 404 and a registry error body."""

    host: str
    routes: dict[str, Route]

    def ref(self, path: str) -> str:
        return f"{self.host}/{path}"


def send(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str = "application/octet-stream",
    *,
    cut_at: int | None = None,
) -> None:
    """Answers with `body`; `cut_at` closes the connection after that many bytes."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command == "HEAD":
        return
    handler.wfile.write(body if cut_at is None else body[:cut_at])
    handler.wfile.flush()
    if cut_at is not None:
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def scripted_registry() -> Iterator[ScriptedRegistry]:
    routes: dict[str, Route] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path.removeprefix("/v2/")
            route = routes.get(path)
            if route is None:
                error = {"errors": [{"code": "NOT_FOUND", "message": f"no {path}"}]}
                send(self, 404, json.dumps(error).encode(), "application/json")
            else:
                route(self)

        do_HEAD = do_GET

    with serving(Handler) as server:
        yield ScriptedRegistry(f"127.0.0.1:{server.server_address[1]}", routes)


# Another host: a second containerd.


def _containerd_binary(daemon: Daemon) -> str | None:
    if daemon.embedded is not None:
        return daemon.embedded.binary
    if found := shutil.which("containerd"):
        return found
    installed = sorted(INSTALLED.glob("containerd-*"))
    return str(installed[-1]) if installed else None


@pytest.fixture(scope="session")
def other_daemon(daemon: Daemon) -> Iterator[str]:
    """The address of a second containerd of the same version, standing for another host."""
    binary = _containerd_binary(daemon)
    if binary is None:
        pytest.skip("no containerd binary for a second daemon (PATH or .containerd/bin)")
    root = tempfile.mkdtemp(prefix="ctrd2-", dir="/tmp")
    embedded = EmbeddedContainerd(root, binary).start()
    try:
        yield embedded.address
    finally:
        embedded.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Host:
    """A manager on the other host, and a client on its namespace."""

    cm: Manager
    client: Client


@pytest.fixture
def other_host(other_daemon: str, namespace: str, tmp_path: pathlib.Path) -> Iterator[Host]:
    with Client(other_daemon, namespace=namespace) as client:
        cm = Manager.open(
            other_daemon,
            namespace=namespace,
            snapshotter=SNAPSHOTTER,
            state_dir=tmp_path / "other-state",
        )
        try:
            yield Host(cm, client)
        finally:
            cm.close()
            clean_namespace(client)
