"""Hostile registries (issue 16), played by servers on 127.0.0.1 over HTTP and HTTPS (a
certificate made by the test): credentials go only to the registry's own origin, every body
is capped on its decoded bytes, every request and blob has a deadline, and what a registry
says reaches the terminal escaped. The model is what Docker's and containerd's registry
clients refuse, and the distribution spec's rules on `Location` and auth."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import threading
import time
from collections.abc import Callable

import pytest
import zstandard

from pyctrd_cache import (
    AuthError,
    CacheError,
    DescHandler,
    ImmutableRef,
    InvalidError,
    UnavailableError,
    cli,
)
from pyctrd_cache.client import Descriptor
from pyctrd_cache.registry import RegistryProvider, parse_reference, push
from tests.cli_runs import Cli, one_line_error, run
from tests.fix_containerd import Daemon, Managers
from tests.hostile_fix import (
    Handler,
    Seen,
    bomb,
    drip,
    error_body,
    peak_memory,
    refused,
    reply,
    serve,
)
from tests.layers import TAR_GZIP, BytesProvider, digest_of, layer
from tests.registry_fix import PASSWORD, USER

Certificate = tuple[pathlib.Path, pathlib.Path]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
JSON = {"Content-Type": "application/json"}
TOKEN = "tok-" + "s3cret" * 4


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def image(layer_size: int | None = None) -> tuple[dict[str, bytes], bytes, Descriptor]:
    """A one-layer image: the blobs by digest, the manifest, and the layer's descriptor
    (its size in the manifest is `layer_size` when given)."""
    blob, desc = layer({"f": b"hostile"})
    diff_id = desc.annotations["containerd.io/uncompressed"]
    config = _json({"rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": TAR_GZIP,
                    "digest": desc.digest,
                    "size": desc.size if layer_size is None else layer_size,
                }
            ],
        }
    )
    return {desc.digest: blob, digest_of(config): config}, manifest, desc


def registry_answer(
    blobs: dict[str, bytes], manifest: bytes, *, auth: Callable[[Handler, Seen], bool]
) -> Callable[[Handler, Seen], None]:
    """A registry serving `manifest` (any tag) and `blobs` to requests `auth` lets through
    (it answers the others itself)."""

    def answer(h: Handler, seen: Seen) -> None:
        if not auth(h, seen):
            return
        path = seen.path.partition("?")[0]
        if "/manifests/" in path:
            reply(h, 200, manifest, {"Content-Type": OCI_MANIFEST})
        elif "/blobs/" in path and path.rsplit("/", 1)[1] in blobs:
            reply(h, 200, blobs[path.rsplit("/", 1)[1]])
        else:
            reply(h, 404, error_body("unknown"), JSON)

    return answer


def no_auth(h: Handler, seen: Seen) -> bool:
    return True


# 1. A Location on another origin gets no credentials.


def _basic_gate(h: Handler, seen: Seen) -> bool:
    if seen.headers.get("authorization", "").startswith("Basic "):
        return True
    reply(h, 401, error_body("auth"), {**JSON, "WWW-Authenticate": 'Basic realm="r"'})
    return False


def _bearer_gate(base: str) -> Callable[[Handler, Seen], bool]:
    def gate(h: Handler, seen: Seen) -> bool:
        if seen.path.startswith("/token"):
            reply(h, 200, _json({"token": TOKEN}), JSON)
            return False
        if seen.headers.get("authorization") == f"Bearer {TOKEN}":
            return True
        challenge = f'Bearer realm="{base}/token",service="s"'
        reply(h, 401, error_body("auth"), {**JSON, "WWW-Authenticate": challenge})
        return False

    return gate


def _uploads(
    gate: Callable[[Handler, Seen], bool], location: str
) -> Callable[[Handler, Seen], None]:
    """A registry that has no blob and sends uploads to `location`."""

    def answer(h: Handler, seen: Seen) -> None:
        if not gate(h, seen):
            return
        path = seen.path.partition("?")[0]
        if seen.method == "HEAD":
            reply(h, 404, b"")
        elif seen.method == "POST" and path.endswith("/blobs/uploads/"):
            reply(h, 202, b"", {"Location": location})
        elif seen.method == "PUT" and "/manifests/" in path:
            reply(h, 201, b"")
        else:
            reply(h, 404, error_body("unknown"), JSON)

    return answer


def _elsewhere(h: Handler, seen: Seen) -> None:
    """Another origin that takes the upload."""
    reply(h, 201 if seen.method == "PUT" else 202, b"", {"Location": "/upload/2"})


@pytest.mark.parametrize(
    ("scheme", "challenge"),
    [("http", "basic"), ("http", "bearer"), ("https", "basic"), ("https", "bearer")],
)
def test_upload_location_on_another_origin_gets_no_credentials(
    managers: Managers, certificate: Certificate, scheme: str, challenge: str
) -> None:
    cm = managers.open()
    blob, desc = layer({"f": b"pushed"})
    with (
        serve(certificate if scheme == "https" else None) as registry,
        serve() as other,
        cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))}) as ref,
    ):
        # From an HTTPS registry, the other origin is plain HTTP on another port.
        other.answer = _elsewhere
        gate = _basic_gate if challenge == "basic" else _bearer_gate(registry.base)
        registry.answer = _uploads(gate, f"{other.base}/upload/1")
        push(
            ref,
            registry.ref("team/app:1"),
            auth=(USER, PASSWORD),
            insecure=scheme == "http",
        )
    leaked = [s for s in other.seen if s.carries_secret() or TOKEN in str(s.headers)]
    refused(bool(other.seen) and not leaked, leaked)


# 2. A challenge from a host the registry redirected to is not answered.


@pytest.mark.parametrize("challenge", ["bearer", "basic"])
def test_challenge_after_a_redirect_to_another_host_is_not_answered(challenge: str) -> None:
    _, _, desc = image()
    with serve() as registry, serve() as other:
        registry.answer = lambda h, s: reply(
            h, 307, b"", {"Location": f"{other.base}/storage/{desc.digest}"}
        )

        def other_answer(h: Handler, seen: Seen) -> None:
            if seen.path.startswith("/token"):
                reply(h, 200, _json({"token": "stolen"}), JSON)
            elif challenge == "bearer":
                realm = f'Bearer realm="{other.base}/token",service="evil"'
                reply(h, 401, b"", {"WWW-Authenticate": realm})
            else:
                reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="evil"'})

        other.answer = other_answer
        provider = RegistryProvider(
            registry.ref("team/app:1"), auth=(USER, PASSWORD), insecure=True
        )
        with pytest.raises(AuthError) as info:
            provider.open(desc).read()
    leaked = [s for s in other.seen if s.carries_secret()]
    refused(not leaked and "another host" in str(info.value), (leaked, info.value))


# 3. A token realm over plain HTTP from an HTTPS registry gets no password.


def test_http_realm_of_an_https_registry_gets_no_password(certificate: Certificate) -> None:
    with serve(certificate) as registry, serve() as realm:
        realm.answer = lambda h, s: reply(h, 200, _json({"token": TOKEN}), JSON)
        challenge = f'Bearer realm="{realm.base}/token",service="s"'
        registry.answer = lambda h, s: reply(h, 401, b"", {"WWW-Authenticate": challenge})
        provider = RegistryProvider(registry.ref("team/app:1"), auth=(USER, PASSWORD))
        with pytest.raises(AuthError) as info:
            provider.manifest()
    refused(realm.seen == [] and "HTTPS" in str(info.value), (realm.seen, info.value))


def test_https_registry_with_https_realm_still_works(certificate: Certificate) -> None:
    """The control: a realm on another HTTPS origin, as token servers often are, gets the
    credentials the registry asked for."""
    blobs, manifest, _ = image()
    with serve(certificate) as registry, serve(certificate) as realm:
        realm.answer = lambda h, s: reply(h, 200, _json({"token": TOKEN}), JSON)
        registry.answer = registry_answer(blobs, manifest, auth=_bearer_gate(realm.base))
        desc, _ = RegistryProvider(registry.ref("team/app:1"), auth=(USER, PASSWORD)).manifest()
    assert desc.digest == digest_of(manifest)
    assert any(s.carries_secret() for s in realm.seen)


# 4. Credentials in a reference are refused and never echoed.


@pytest.mark.parametrize(
    "text",
    [
        f"{USER}:{PASSWORD}@127.0.0.1:5000/team/app:1",
        f"https://{USER}:{PASSWORD}@127.0.0.1:5000/team/app",
        f"{PASSWORD}@127.0.0.1/team/app",
    ],
)
def test_credentials_in_a_reference_are_never_echoed(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path, text: str
) -> None:
    with pytest.raises(InvalidError) as info:
        parse_reference(text)
    out = Cli(daemon, namespace, tmp_path / "state")("pull", text, "--insecure")
    one_line_error(out, "credentials")
    shown = str(info.value) + out.stderr
    refused(PASSWORD not in shown, shown)


# 5. Bodies are capped on their decoded bytes.

BOMB = 256 << 20
MEMORY = 24 << 20


def _bomb_answer(kind: str, encoding: str) -> Callable[[Handler, Seen], None]:
    body = bomb(encoding, BOMB)
    bombed = {"Content-Encoding": encoding, **JSON}

    def answer(h: Handler, seen: Seen) -> None:
        if kind == "token":
            if seen.path.startswith("/token"):
                reply(h, 200, body, bombed)
            else:
                host = h.headers["Host"]
                challenge = f'Bearer realm="http://{host}/token",service="s"'
                reply(h, 401, b"", {"WWW-Authenticate": challenge})
        else:
            reply(h, 200 if kind == "manifest" else 404, body, bombed)

    return answer


def _endless(h: Handler, seen: Seen) -> None:
    """64 MiB of a manifest that never ends, without a length."""
    h.send_response(200)
    h.send_header("Content-Type", OCI_MANIFEST)
    h.send_header("Connection", "close")
    h.end_headers()
    chunk = b" " * (1 << 20)
    try:
        for _ in range(64):
            h.wfile.write(chunk)
    except OSError:
        return


@pytest.mark.parametrize(
    ("kind", "encoding"),
    [
        ("manifest", "gzip"),
        ("manifest", "zstd"),
        ("manifest", "endless"),
        ("token", "zstd"),
        ("error", "zstd"),
        ("error", "gzip"),
    ],
)
def test_bodies_are_capped_on_their_decoded_bytes(kind: str, encoding: str) -> None:
    with serve() as registry:
        registry.answer = _endless if encoding == "endless" else _bomb_answer(kind, encoding)
        provider = RegistryProvider(registry.ref("team/app:1"), insecure=True)
        with peak_memory() as peak, pytest.raises(CacheError) as info:
            provider.manifest()
    refused(peak[0] < MEMORY, (peak[0], info.value))
    expected = {"manifest": "larger than", "token": "larger than", "error": "not read"}[kind]
    assert expected in str(info.value)


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_encoded_bodies_within_the_caps_are_read(encoding: str) -> None:
    """The control: a manifest and a blob sent with a `Content-Encoding` arrive decoded."""
    blobs, manifest, desc = image()
    encode = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[encoding]

    def answer(h: Handler, seen: Seen) -> None:
        body = manifest if "/manifests/" in seen.path else blobs[desc.digest]
        reply(h, 200, encode(body), {"Content-Encoding": encoding, "Content-Type": OCI_MANIFEST})

    with serve() as registry:
        registry.answer = answer
        provider = RegistryProvider(registry.ref("team/app:1"), insecure=True)
        found, _ = provider.manifest()
        with provider.open(desc) as stream:
            got = stream.read()
    assert found.digest == digest_of(manifest)
    assert got == blobs[desc.digest]


# 6. Deadlines: per request, and per blob relative to its size.


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv("PYCTRD_CACHE_HTTP_TIMEOUT", "1")
    return 1.0


@pytest.mark.usefixtures("short_timeout")
@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_a_dripping_registry_hits_the_deadline(what: str) -> None:
    blobs, manifest, desc = image()
    with serve() as registry:
        registry.answer = lambda h, s: drip(
            h, manifest if what == "manifest" else blobs[desc.digest], 0.25, JSON
        )
        provider = RegistryProvider(registry.ref("team/app:1"), insecure=True)
        started = time.monotonic()

        def fetch() -> object:
            if what == "manifest":
                return provider.manifest()
            with provider.open(desc) as stream:
                return stream.read()

        with pytest.raises(CacheError) as info:
            fetch()
        took = time.monotonic() - started
    refused(isinstance(info.value, UnavailableError) and took < 4, (took, info.value))


def test_a_blob_gets_time_by_its_size() -> None:
    """The control: a blob slower than the timeout but faster than the minimum throughput
    arrives."""
    data = os.urandom(256 << 10)
    desc = Descriptor(TAR_GZIP, digest_of(data), len(data))

    def answer(h: Handler, seen: Seen) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for i in range(0, len(data), 16 << 10):
            h.wfile.write(data[i : i + (16 << 10)])
            h.wfile.flush()
            time.sleep(0.15)

    with serve() as registry:
        registry.answer = answer
        provider = RegistryProvider(registry.ref("team/app:1"), insecure=True, timeout=0.5)
        started = time.monotonic()
        with provider.open(desc) as stream:
            got = stream.read()
        assert time.monotonic() - started > 0.5
    assert hashlib.sha256(got).hexdigest() == desc.digest.removeprefix("sha256:")


def test_cli_timeout_option(daemon: Daemon, namespace: str, tmp_path: pathlib.Path) -> None:
    _, manifest, _ = image()
    cli = Cli(daemon, namespace, tmp_path / "state")
    with serve() as registry:
        registry.answer = lambda h, s: drip(h, manifest, 0.25, JSON)
        started = time.monotonic()
        out = cli("pull", registry.ref("team/app:1"), "--insecure", "--timeout", "1")
        took = time.monotonic() - started
    one_line_error(out, registry.ref("team/app:1"), "took too long")
    refused(took < 15, took)
    assert run("pull", "127.0.0.1:1/a", "--timeout", "0").returncode == 2
    assert run("pull", "127.0.0.1:1/a", "--timeout", "soon").returncode == 2


# 10. Sizes and lengths no one can hold: clear errors, never a traceback.


def test_descriptor_size_of_2_63_is_a_clear_error(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path
) -> None:
    blobs, manifest, _ = image(layer_size=1 << 63)
    serves = registry_answer(blobs, manifest, auth=no_auth)

    def answer(h: Handler, seen: Seen) -> None:
        if seen.method != "HEAD":
            serves(h, seen)
            return
        # A HEAD that does not tell the blob's length.
        h.send_response(200)
        h.end_headers()

    with serve() as registry:
        registry.answer = answer
        out = Cli(daemon, namespace, tmp_path / "state")(
            "pull", registry.ref("team/app:1"), "--insecure"
        )
    refused(out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr)
    one_line_error(out, str(1 << 63))


def test_a_70000_character_repository_is_a_clear_error(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path
) -> None:
    text = "127.0.0.1:1/" + "a" * 70_000
    out = Cli(daemon, namespace, tmp_path / "state")("pull", text, "--insecure")
    refused(out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr[-300:])
    one_line_error(out, "at most 255")
    assert len(out.stderr) < 1000


def test_no_exception_escapes_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("not foreseen\n\x1b[2Jsecond line")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "pyctrd-cache: error: unexpected RuntimeError: not foreseen; \\x1b[2Jsecond line"
    ]


# 15. What a registry says reaches the terminal escaped.


def test_registry_error_text_is_escaped(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path
) -> None:
    hostile = "gone\x1b[2J\x1b]0;owned\x07\x9b31m\rforged prompt"
    with serve() as registry:
        registry.answer = lambda h, s: reply(h, 404, error_body(hostile), JSON)
        out = Cli(daemon, namespace, tmp_path / "state")(
            "pull", registry.ref("team/app:1"), "--insecure"
        )
    raw = [c for c in out.stderr.rstrip("\n") if not c.isprintable()]
    refused(raw == [], raw)
    one_line_error(out, "gone\\x1b[2J\\x1b]0;owned\\x07\\x9b31m; forged prompt")


# 16. A registry that refuses one upload of a push: the push stops its other uploads.

UPLOAD_THREAD = "pyctrd-cache-push"


def _upload_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == UPLOAD_THREAD]


def _refusing_first_upload() -> Callable[[Handler, Seen], None]:
    """A registry that has no blob, refuses the first upload's first piece, and holds the
    first piece of every other upload until the refused upload's thread has ended (so the
    push has seen the failure), for at most 10 s."""
    uploads = iter(range(1_000_000))
    mu = threading.Lock()

    def answer(h: Handler, seen: Seen) -> None:
        path = seen.path.partition("?")[0]
        if seen.method == "HEAD":
            reply(h, 404, b"")
        elif seen.method == "POST" and path.endswith("/blobs/uploads/"):
            with mu:
                n = next(uploads)
            reply(h, 202, b"", {"Location": f"/upload/{n}"})
        elif seen.method == "PATCH" and path == "/upload/0":
            reply(h, 400, error_body("upload refused"), JSON)
        elif seen.method == "PATCH":
            deadline = time.monotonic() + 10
            while len(_upload_threads()) > 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            reply(h, 202, b"", {"Location": path})
        else:
            reply(h, 201, b"")

    return answer


def test_a_refused_upload_stops_the_push_and_leaves_no_upload_running(
    managers: Managers,
) -> None:
    cm = managers.open()
    provider = BytesProvider()
    handlers: dict[str, DescHandler] = {}
    ref: ImmutableRef | None = None
    for i in range(6):  # twice the uploads a push runs at a time
        blob, desc = layer({f"f{i}": os.urandom(400)})
        provider.add(blob)
        handlers[desc.digest] = DescHandler(provider)
        parent = ref
        ref = cm.get_by_blob(desc, parent, desc_handlers=handlers)
        if parent is not None:
            parent.release()
    assert ref is not None
    assert _upload_threads() == []
    with serve() as registry, ref:
        registry.answer = _refusing_first_upload()
        with pytest.raises(InvalidError, match="upload refused"):
            push(ref, registry.ref("team/app:1"), insecure=True, chunk_size=100)
        assert _upload_threads() == []
        methods = [s.method for s in registry.seen]
    # The three uploads running when the first failed stopped at their next piece (none got
    # past its first); the three waiting never started; no blob or manifest was completed.
    assert methods.count("HEAD") == methods.count("POST") == 3, methods
    assert methods.count("PATCH") <= 3, methods
    assert "PUT" not in methods, methods
