"""Registries: a chain pushed from one host's cache to a real distribution registry and
pulled lazily into another host's cache (a second containerd), without auth, with htpasswd
basic auth and with token auth; checked by skopeo both ways; and registries that answer
badly, with nothing left behind."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pyctrd_cache import (
    AuthError,
    CacheError,
    Compression,
    ImmutableRef,
    InvalidError,
    Manager,
    NotFoundError,
    ProgressEvent,
    PrunePolicy,
    export_layout,
    import_path,
)
from pyctrd_cache.client import Client
from pyctrd_cache.oci import machine_platform
from pyctrd_cache.registry import (
    Credentials,
    RegistryProvider,
    parse_reference,
    pull,
    push,
)
from tests.checks import blob_count, gc, owned_leases, snapshot_names
from tests.cli_runs import Cli, one_line_error
from tests.fix_containerd import Daemon, Managers
from tests.integration.test_oci import make_tree, tree_of
from tests.layers import TAR_GZIP, TAR_ZSTD, digest_of, layer
from tests.registry_fix import PASSWORD, USER, Host, Registry, ScriptedRegistry, send
from tests.stargz_fix import CountingProxy

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, chown and mknod need root")
pytestmark = needs_root

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


Tree = dict[str, tuple[Any, ...]]


def chain(cm: Manager, tmp_path: pathlib.Path) -> tuple[ImmutableRef, Tree]:
    """Two layers: the sample tree, and files added on top; returns the top ref and the
    tree it shows."""
    src = make_tree(tmp_path)
    top = tmp_path / "top"
    top.mkdir()
    (top / "added.txt").write_text("second layer\n")
    (top / "big2.bin").write_bytes(os.urandom(300_000))
    with import_path(cm, src, description="base") as base:
        ref = import_path(cm, top, parent=base, description="top")
    with ref.mount() as root:
        return ref, tree_of(root, mtime_ns=False)


def assert_nothing_left(cm: Manager, client: Client) -> None:
    """No record, lease, snapshot, blob or ingest after containerd's collector ran."""
    gc(client)
    assert cm.disk_usage() == []
    assert owned_leases(client, cm) == []
    assert snapshot_names(client) == []
    assert blob_count(client) == 0
    assert client.content.list_statuses() == []


def pulled_tree_matches(host: Host, reference: str, want: Tree, **kw: Any) -> None:
    with pull(host.cm, reference, **kw) as ref:
        assert ref.is_lazy()
        assert host.client.content.list() == []  # nothing pulled yet
        assert ref.info().image_refs == (reference,)
        ref.extract()
        with ref.mount() as root:
            assert tree_of(root, mtime_ns=False) == want


def skopeo_layers(reference: str, *extra: str) -> list[str]:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *extra, f"docker://{reference}"],
        capture_output=True,
        text=True,
        check=True,
    )
    layers: list[str] = json.loads(out.stdout)["Layers"]
    return layers


# References.


@pytest.mark.parametrize(
    ("text", "host", "repository", "tag", "digest"),
    [
        ("127.0.0.1:5000/team/app:1", "127.0.0.1:5000", "team/app", "1", None),
        ("localhost/app", "localhost", "app", None, None),
        ("reg.test/a/b@sha256:" + "a" * 64, "reg.test", "a/b", None, "sha256:" + "a" * 64),
    ],
)
def test_reference_parsing(
    text: str, host: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text", ["team/app:1", "app", "127.0.0.1:5000/Team/app", "127.0.0.1:5000/a:b:c", ""]
)
def test_reference_without_host_or_malformed_is_invalid(text: str) -> None:
    with pytest.raises(InvalidError, match="invalid registry reference"):
        parse_reference(text)


# Two hosts in miniature, through a registry without auth.


def test_push_then_lazy_pull_on_another_host(
    managers: Managers, other_host: Host, open_registry: Registry, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    target = open_registry.ref("team/app:1")
    events: list[ProgressEvent] = []
    with ref:
        manifest = push(ref, target, insecure=True, progress=events.append)
        remote = ref.get_remote()
    assert manifest.media_type == OCI_MANIFEST
    ended = sorted(e.digest for e in events if e.kind == "end")
    assert ended == sorted(d.digest for d in remote.descriptors)
    assert all(e.error is None for e in events)
    assert skopeo_layers(target) == [d.digest for d in remote.descriptors]

    pulled_tree_matches(other_host, target, want, insecure=True)

    # A second push finds every blob there (HEAD) and sends the manifest only.
    events.clear()
    with cm.get(ref.id) as again:
        assert push(again, target, insecure=True, progress=events.append) == manifest
    assert not [e for e in events if e.kind == "bytes"]

    # By digest, the same records.
    by_digest = open_registry.ref(f"team/app@{manifest.digest}")
    with pull(other_host.cm, by_digest, insecure=True) as ref2:
        assert by_digest in ref2.info().image_refs


def test_chunked_push_and_zstd(
    managers: Managers,
    other_host: Host,
    open_registry: Registry,
    registry_proxy: CountingProxy,
    tmp_path: pathlib.Path,
) -> None:
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    chunk = 256 << 10
    with ref:
        pushed = push(
            ref,
            registry_proxy.ref("team/chunked:zst"),
            insecure=True,
            compression=Compression.ZSTD,
            force_compression=True,
            chunk_size=chunk,
        )
    manifest = httpx.get(
        open_registry.url(f"team/chunked/manifests/{pushed.digest}"),
        headers={"Accept": OCI_MANIFEST},
    ).json()
    sizes = [layer["size"] for layer in manifest["layers"]]
    assert [layer["mediaType"] for layer in manifest["layers"]] == [TAR_ZSTD] * 2
    assert all(size > chunk for size in sizes), sizes
    # Each layer went up in PATCHes of at most `chunk` bytes that cover it in order.
    patches = [r for r in registry_proxy.requests if r.method == "PATCH"]
    spans = []
    for request in patches:
        assert request.content_range is not None, request
        start, end = (int(n) for n in request.content_range.split("-"))
        spans.append((start, end - start + 1))
    assert len(patches) == sum(-(-size // chunk) for size in sizes)
    assert all(length <= chunk for _, length in spans)
    assert sorted(start for start, _ in spans) == sorted(
        start for size in sizes for start in range(0, size, chunk)
    )
    assert sum(length for _, length in spans) == sum(sizes)
    pulled_tree_matches(other_host, open_registry.ref("team/chunked:zst"), want, insecure=True)


def test_pull_then_push_mounts_across_repositories(
    managers: Managers, other_host: Host, open_registry: Registry, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    ref, _ = chain(cm, tmp_path)
    source = open_registry.ref("team/source:1")
    with ref:
        push(ref, source, insecure=True)
    with pull(other_host.cm, source, insecure=True) as lazy:
        target = open_registry.ref("team/mounted:1")
        push(lazy, target, insecure=True)
        # Mounted, not uploaded: the lazy blobs were never pulled.
        assert lazy.is_lazy()
        assert other_host.client.content.list() == []
    answer = httpx.get(
        open_registry.url("team/mounted/manifests/1"), headers={"Accept": OCI_MANIFEST}
    )
    assert answer.status_code == 200


def test_index_resolves_to_this_platform(
    managers: Managers, other_host: Host, open_registry: Registry, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    with ref:
        manifest = push(ref, open_registry.ref("team/multi:single"), insecure=True)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**manifest.to_oci(), "platform": {"os": "plan9", "architecture": "mips"}},
            {**manifest.to_oci(), "platform": machine_platform()},
        ],
    }
    answer = httpx.put(
        open_registry.url("team/multi/manifests/multi"),
        content=json.dumps(index).encode(),
        headers={"Content-Type": OCI_INDEX},
    )
    assert answer.status_code == 201, answer.text
    pulled_tree_matches(other_host, open_registry.ref("team/multi:multi"), want, insecure=True)


def test_pull_an_image_pushed_by_skopeo(
    managers: Managers, other_host: Host, open_registry: Registry, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    with ref:
        export_layout(ref, tmp_path / "layout", tag="v1")
    target = open_registry.ref("skopeo/img:1")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{tmp_path / 'layout'}:v1",
            f"docker://{target}",
        ],
        check=True,
        capture_output=True,
    )
    pulled_tree_matches(other_host, target, want, insecure=True)


# Basic auth (htpasswd).


def test_basic_auth(
    managers: Managers,
    other_host: Host,
    basic_registry: Registry,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    target = basic_registry.ref("team/basic:1")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    with ref:
        with pytest.raises(AuthError, match=f"{target}.*no credentials"):
            push(ref, target, insecure=True)
        with pytest.raises(AuthError, match=target):
            push(ref, target, insecure=True, auth=(USER, "wrong"))
        push(ref, target, insecure=True, auth=(USER, PASSWORD))

    with pytest.raises(AuthError, match=target):
        pull(other_host.cm, target, insecure=True)
    assert_nothing_left(other_host.cm, other_host.client)

    # Credentials from the Docker config file.
    config = tmp_path / "docker"
    config.mkdir()
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config / "config.json").write_text(
        json.dumps({"auths": {f"http://{basic_registry.host}": {"auth": encoded}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    pulled_tree_matches(other_host, target, want, insecure=True)


# Token auth.


def test_token_auth(
    managers: Managers,
    other_host: Host,
    token_registry: Registry,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    cm = managers.open()
    ref, want = chain(cm, tmp_path)
    target = token_registry.ref("team/token:1")
    creds = Credentials(USER, PASSWORD)
    with ref:
        with pytest.raises(AuthError, match=target):
            push(ref, target, insecure=True)
        tokens.requests.clear()
        push(ref, target, insecure=True, auth=creds)
        assert ("POST", "password") in tokens.requests  # the OAuth2 form first
        remote = ref.get_remote()
    assert skopeo_layers(target, f"--creds={USER}:{PASSWORD}") == [
        d.digest for d in remote.descriptors
    ]

    with pytest.raises(AuthError, match=target):
        pull(other_host.cm, target, insecure=True)
    assert_nothing_left(other_host.cm, other_host.client)

    # A token server without the POST form: the GET form with basic auth.
    tokens.post = False
    try:
        tokens.requests.clear()
        pulled_tree_matches(other_host, target, want, insecure=True, auth=creds)
        assert ("GET", "basic") in tokens.requests
    finally:
        tokens.post = True


# Registries that answer badly.


def _manifest_for(layers: list[tuple[bytes, dict[str, object]]], config: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [d for _, d in layers],
        }
    ).encode()


def _image(scripted: ScriptedRegistry, repo: str, **blob_routes: object) -> tuple[bytes, str]:
    """An image of one gzip layer in the scripted registry; returns its blob and digest."""
    blob, desc = layer({"hello.txt": b"hello from the scripted registry\n"})
    diff_id = desc.annotations["containerd.io/uncompressed"]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = _manifest_for(
        [(blob, {"mediaType": TAR_GZIP, "digest": desc.digest, "size": desc.size})], config
    )
    routes = scripted.routes
    routes[f"{repo}/manifests/1"] = lambda h: send(h, 200, manifest, OCI_MANIFEST)
    routes[f"{repo}/blobs/{digest_of(config)}"] = lambda h: send(h, 200, config)
    routes[f"{repo}/blobs/{desc.digest}"] = lambda h: send(h, 200, blob)
    return blob, desc.digest


def test_unknown_repository_or_tag(
    other_host: Host, open_registry: Registry, managers: Managers, tmp_path: pathlib.Path
) -> None:
    for reference in (
        open_registry.ref("nobody/nothing:1"),
        open_registry.ref("team/app:no-such-tag"),
    ):
        with pytest.raises(NotFoundError, match=reference):
            pull(other_host.cm, reference, insecure=True)
    assert_nothing_left(other_host.cm, other_host.client)


def test_manifest_whose_layer_is_missing(
    other_host: Host, scripted_registry: ScriptedRegistry
) -> None:
    _, digest = _image(scripted_registry, "team/broken")
    del scripted_registry.routes[f"team/broken/blobs/{digest}"]
    reference = scripted_registry.ref("team/broken:1")
    with pytest.raises(NotFoundError, match=f"{digest} is not in {reference}"):
        pull(other_host.cm, reference, insecure=True)
    assert_nothing_left(other_host.cm, other_host.client)


def test_connection_closed_mid_blob(other_host: Host, scripted_registry: ScriptedRegistry) -> None:
    blob, digest = _image(scripted_registry, "team/cut")
    scripted_registry.routes[f"team/cut/blobs/{digest}"] = lambda h: send(
        h, 200, blob, cut_at=len(blob) // 2
    )
    reference = scripted_registry.ref("team/cut:1")
    with pytest.raises(CacheError, match=reference):
        pull(other_host.cm, reference, insecure=True, extract=True)
    assert_nothing_left(other_host.cm, other_host.client)
    # Lazily registered, then extracted: the error names the reference too.
    with (
        pull(other_host.cm, reference, insecure=True) as ref,
        pytest.raises(CacheError, match=reference),
    ):
        ref.extract()
    other_host.cm.prune(PrunePolicy(all=True))
    assert_nothing_left(other_host.cm, other_host.client)


def test_blob_that_does_not_match_its_digest(
    other_host: Host, scripted_registry: ScriptedRegistry
) -> None:
    blob, digest = _image(scripted_registry, "team/lies")
    forged = bytes([blob[0] ^ 0xFF]) + blob[1:]
    scripted_registry.routes[f"team/lies/blobs/{digest}"] = lambda h: send(h, 200, forged)
    with pytest.raises(CacheError, match=digest):
        pull(other_host.cm, scripted_registry.ref("team/lies:1"), insecure=True, extract=True)
    assert_nothing_left(other_host.cm, other_host.client)


def test_unknown_manifest_media_type(other_host: Host, scripted_registry: ScriptedRegistry) -> None:
    odd = b'{"schemaVersion": 2, "mediaType": "application/vnd.example.odd+json"}'
    scripted_registry.routes["team/odd/manifests/1"] = lambda h: send(
        h, 200, odd, "application/vnd.example.odd+json"
    )
    reference = scripted_registry.ref("team/odd:1")
    with pytest.raises(InvalidError, match=f"{reference}.*unsupported manifest media type"):
        pull(other_host.cm, reference, insecure=True)
    assert_nothing_left(other_host.cm, other_host.client)


def test_plain_http_only_on_loopback_with_insecure() -> None:
    with pytest.raises(InvalidError, match="loopback"):
        RegistryProvider("reg.test:5000/team/app:1", insecure=True)


# The command line.


@pytest.fixture
def _after_cli(managers: Managers, client: Client) -> Iterator[None]:
    yield
    cm = managers.open(managers.state_dir)
    cm.prune(PrunePolicy(all=True))
    gc(client)


@pytest.mark.usefixtures("_after_cli")
def test_cli_push_and_pull(
    daemon: Daemon,
    namespace: str,
    managers: Managers,
    open_registry: Registry,
    tmp_path: pathlib.Path,
) -> None:
    cli = Cli(daemon, namespace, managers.state_dir)
    src = make_tree(tmp_path)
    record = cli.ok("import", str(src)).strip()
    target = open_registry.ref("cli/app:1")
    digest = cli.ok("push", record, target, "--insecure").strip()
    assert digest.startswith("sha256:")
    layout = tmp_path / "layout"
    assert cli.ok("push", record, f"oci-layout:{layout}:v1").startswith("sha256:")
    pulled = cli.ok("pull", target, "--insecure").strip()
    assert pulled == record  # same blob chain: the same record
    assert cli.ok("pull", f"oci-layout:{layout}:v1").strip() == record
    # The digest printed is the one of the manifest the tag names.
    manifest = httpx.get(open_registry.url("cli/app/manifests/1"), headers={"Accept": OCI_MANIFEST})
    assert manifest.status_code == 200
    assert "sha256:" + hashlib.sha256(manifest.content).hexdigest() == digest


def test_cli_errors_are_one_line(daemon: Daemon, namespace: str, tmp_path: pathlib.Path) -> None:
    out = Cli(daemon, namespace, tmp_path / "state")("pull", "127.0.0.1:1/team/app:1", "--insecure")
    one_line_error(out, "127.0.0.1:1/team/app:1")
