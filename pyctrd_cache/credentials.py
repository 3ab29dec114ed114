"""Registry credentials from the files and helpers Docker and podman users already have.

For a registry host, the first of these that has an entry for it answers:

1. `$REGISTRY_AUTH_FILE` (podman, skopeo, buildah), else podman's
   `$XDG_RUNTIME_DIR/containers/auth.json`;
2. the Docker config, `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.

In each file, a `credHelpers` entry for the host names its helper; otherwise an `auths` entry
holds the credentials; otherwise `credsStore` names the helper for every host. A helper is
the program `docker-credential-<name>`, run with `get` and the host on its standard input; it
answers `{"Username": ..., "Secret": ...}` (user name `<token>`: the secret is an identity
token) or fails when it has nothing for the host. A helper that cannot be run, takes longer
than `HELPER_TIMEOUT`, or answers something else is an `InvalidError` naming it; its output
never reaches an error message.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pathlib
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import InvalidError

__all__ = ["Credentials", "find_credentials"]

HELPER_TIMEOUT: Final = 30.0
_TOKEN_USER: Final = "<token>"
_MAX_ANSWER: Final = 1 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity token (an OAuth2 refresh token)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r})"


def auth_files() -> list[pathlib.Path]:
    """The files looked in, in order (whether they exist or not)."""
    files = []
    if explicit := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(pathlib.Path(explicit))
    elif runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(pathlib.Path(runtime) / "containers" / "auth.json")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(pathlib.Path(docker) / "config.json")
    return files


def find_credentials(host: str) -> Credentials | None:
    """The credentials for registry `host` (`name[:port]`), or None when nothing has any."""
    for path in auth_files():
        document = _read(path)
        if document is None:
            continue
        found = _from_document(document, path, host)
        if found is not None:
            return found
    return None


def _read(path: pathlib.Path) -> Mapping[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InvalidError(f"cannot read the credentials file {path}: {err.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError as err:
        raise InvalidError(f"the credentials file {path} is not JSON: {err}") from None
    return document if isinstance(document, Mapping) else None


def _from_document(
    document: Mapping[str, Any], path: pathlib.Path, host: str
) -> Credentials | None:
    helpers = document.get("credHelpers")
    if isinstance(helpers, Mapping):
        for key, helper in helpers.items():
            if _config_host(str(key)) == host and isinstance(helper, str) and helper:
                return run_helper(helper, host)
    auths = document.get("auths")
    if isinstance(auths, Mapping):
        for key, entry in auths.items():
            if isinstance(entry, Mapping) and _config_host(str(key)) == host:
                found = _from_entry(entry, path, str(key))
                if found is not None:
                    return found
    store = document.get("credsStore")
    if isinstance(store, str) and store:
        return run_helper(store, host)
    return None


def _from_entry(entry: Mapping[str, Any], path: pathlib.Path, key: str) -> Credentials | None:
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    if encoded := entry.get("auth"):
        try:
            username, _, password = base64.b64decode(str(encoded)).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidError(f"the auth of {key!r} in {path} is not base64") from None
    token = str(entry.get("identitytoken") or "")
    if username or password or token:
        return Credentials(username, password, token)
    return None


def run_helper(name: str, host: str) -> Credentials | None:
    """Asks the credential helper `docker-credential-<name>` for `host`'s credentials; None
    when it has none."""
    if "/" in name or not name.strip():
        raise InvalidError(f"invalid credential helper name {name!r}")
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run(
            [program, "get"],
            input=host.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise InvalidError(f"the credential helper {program} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise InvalidError(
            f"the credential helper {program} did not answer within {HELPER_TIMEOUT:g}s"
        ) from None
    except OSError as err:
        raise InvalidError(f"cannot run the credential helper {program}: {err.strerror}") from None
    if done.returncode != 0:
        log.debug("credential helper %s has nothing for %s", program, host)
        return None
    try:
        answer = json.loads(done.stdout[:_MAX_ANSWER])
        username, secret = answer["Username"], answer["Secret"]
        if not isinstance(username, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InvalidError(
            f"the credential helper {program} answered something other than "
            '{"Username": ..., "Secret": ...}'
        ) from None
    log.debug("credentials for %s from the helper %s", host, program)
    if username == _TOKEN_USER:
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


def _config_host(key: str) -> str:
    """`https://host:5000/v1/` and `host:5000` both give `host:5000`."""
    return key.split("://", 1)[-1].split("/", 1)[0]
