"""Where registry credentials come from: podman's auth file, then the Docker config; in each,
a host's helper, then its `auths` entry, then the store helper."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import sys
import textwrap

import pytest

from pyctrd_cache import Credentials, InvalidError
from pyctrd_cache.credentials import find_credentials

HOST = "registry.test:5000"


@pytest.fixture
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def helper(home: pathlib.Path, name: str, body: str) -> None:
    path = home / "bin" / f"docker-credential-{name}"
    path.write_text(f"#!{sys.executable}\nimport json, sys\n" + textwrap.dedent(body))
    path.chmod(0o755)


def auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def docker_config(home: pathlib.Path, document: object) -> None:
    (home / ".docker").mkdir(exist_ok=True)
    (home / ".docker" / "config.json").write_text(json.dumps(document))


def test_nothing_anywhere(home: pathlib.Path) -> None:
    assert find_credentials(HOST) is None


def test_auths_entry_by_host_or_url(home: pathlib.Path) -> None:
    docker_config(home, {"auths": {f"https://{HOST}/v1/": auth("u", "p:with:colons")}})
    assert find_credentials(HOST) == Credentials("u", "p:with:colons")
    assert find_credentials("other.test") is None


def test_host_helper_before_auths_and_store(home: pathlib.Path) -> None:
    helper(
        home,
        "one",
        """
        assert sys.argv[1:] == ["get"]
        host = sys.stdin.read()
        print(json.dumps({"ServerURL": host, "Username": "from-helper", "Secret": host}))
        """,
    )
    helper(home, "store", 'print(json.dumps({"Username": "from-store", "Secret": "s"}))\n')
    docker_config(
        home,
        {
            "credHelpers": {HOST: "one"},
            "auths": {HOST: auth("from-auths", "p"), "other.test": {}},
            "credsStore": "store",
        },
    )
    assert find_credentials(HOST) == Credentials("from-helper", HOST)
    assert find_credentials("other.test") == Credentials("from-store", "s")


def test_token_from_a_helper(home: pathlib.Path) -> None:
    helper(home, "tok", 'print(json.dumps({"Username": "<token>", "Secret": "refresh"}))\n')
    docker_config(home, {"credsStore": "tok"})
    assert find_credentials(HOST) == Credentials(identity_token="refresh")


def test_a_helper_with_nothing_lets_the_next_file_answer(
    home: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper(home, "empty", 'print("credentials not found in native keychain")\nsys.exit(1)\n')
    auth_file = home / "auth.json"
    auth_file.write_text(json.dumps({"credsStore": "empty"}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    docker_config(home, {"auths": {HOST: auth("docker", "p")}})
    assert find_credentials(HOST) == Credentials("docker", "p")


def test_podman_auth_file_before_the_docker_config(
    home: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker_config(home, {"auths": {HOST: auth("docker", "p")}})
    runtime = home / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers" / "auth.json").write_text(
        json.dumps({"auths": {HOST: auth("podman", "p")}})
    )
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert find_credentials(HOST) == Credentials("podman", "p")
    explicit = home / "explicit.json"
    explicit.write_text(json.dumps({"auths": {HOST: auth("explicit", "p")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert find_credentials(HOST) == Credentials("explicit", "p")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "not on PATH"),
        ('print("not json, and a secret: hunter2")\n', "answered something other"),
        ('print(json.dumps({"Username": "u"}))\n', "answered something other"),
    ],
    ids=["missing", "garbage", "no-secret"],
)
def test_a_broken_helper_is_a_clear_error_without_its_output(
    home: pathlib.Path, body: str | None, message: str
) -> None:
    if body is not None:
        helper(home, "broken", body)
    docker_config(home, {"credsStore": "broken"})
    with pytest.raises(InvalidError, match=message) as raised:
        find_credentials(HOST)
    assert "docker-credential-broken" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_helper_name_cannot_be_a_path(home: pathlib.Path) -> None:
    docker_config(home, {"credsStore": "../../bin/sh"})
    with pytest.raises(InvalidError, match="invalid credential helper name"):
        find_credentials(HOST)
