"""The compose file (a containerd plus the integration tests against it), checked statically.

No Docker engine is needed: the file is parsed, and the containerd image's config is
regenerated with `daemon_config` from the arguments its Dockerfile passes.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyctrd_cache.daemon_config import daemon_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SOCKET_NAME = "containerd.sock"
CRI_PLUGINS = {
    1: {"io.containerd.grpc.v1.cri"},
    2: {"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"},
}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict)
    return service


def _dockerfile(service: str) -> Path:
    build = _service(service)["build"]
    assert isinstance(build, dict), f"{service}: build must name its context and dockerfile"
    context, dockerfile = str(build.get("context", ".")), str(build["dockerfile"])
    return (ROOT / context / dockerfile).resolve()


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of `dockerfile`, continuation lines joined."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def _config_args(dockerfile: Path) -> dict[str, str]:
    """The --option values of the RUN that generates the config with daemon_config.py."""
    runs = [args for ins, args in _instructions(dockerfile) if ins == "RUN"]
    generating = [args for args in runs if "daemon_config.py" in args]
    assert len(generating) == 1, "the image must generate its config with daemon_config.py"
    words = shlex.split(generating[0])
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--") and i + 1 < len(words):
            options[word] = words[i + 1]
        if word == ">" and i + 1 < len(words):
            options[">"] = words[i + 1]
    return options


def _mounts(service: str) -> dict[str, str]:
    """Mount target -> source of `service`'s volumes (short and long syntax)."""
    mounts: dict[str, str] = {}
    for volume in _service(service).get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, _, rest = str(volume).partition(":")
            target = rest.split(":")[0] if rest else source
            mounts[target] = source if rest else ""
    return mounts


def _is_named(source: str) -> bool:
    return bool(source) and not source.startswith(("/", ".", "~", "$"))


def _environment(service: str) -> dict[str, str]:
    env = _service(service).get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _healthcheck_words(test: str | list[str]) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] in ("CMD", "CMD-SHELL"):
        return test[1:] if test[0] == "CMD" else shlex.split(" ".join(test[1:]))
    return test


def _walk(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key path, value) of every leaf of a parsed TOML document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    else:
        yield path, value


def test_services_exist() -> None:
    assert {"containerd", "tests"} <= set(_compose()["services"])


@pytest.mark.parametrize("name", ["containerd", "tests"])
def test_service_is_privileged_on_host_network(name: str) -> None:
    service = _service(name)
    assert service.get("privileged") is True
    assert service.get("network_mode") == "host"


@pytest.mark.parametrize("name", ["containerd", "tests"])
def test_services_build_from_the_same_base_image_argument(name: str) -> None:
    args = _service(name)["build"].get("args", {})
    assert "BASE_IMAGE" in args
    assert "${BASE_IMAGE:-" in str(args["BASE_IMAGE"])
    instructions = _instructions(_dockerfile(name))
    assert instructions[0][0] == "ARG"
    assert instructions[0][1].startswith("BASE_IMAGE=")
    assert ("FROM", "${BASE_IMAGE}") in instructions


def test_containerd_dockerfile_generates_config_and_has_healthcheck() -> None:
    dockerfile = _dockerfile("containerd")
    assert dockerfile.is_file()
    assert dockerfile.is_relative_to(ROOT)
    instructions = _instructions(dockerfile)
    healthchecks = [args for ins, args in instructions if ins == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    options = _config_args(dockerfile)
    assert "ctr" in healthchecks[0]
    assert "version" in healthchecks[0]
    assert options["--address"] in healthchecks[0]
    # The daemon runs with the config the build generated.
    cmd = [args for ins, args in instructions if ins == "CMD"]
    assert len(cmd) == 1
    assert "containerd" in cmd[0]
    assert options[">"] in cmd[0]


def test_containerd_service_healthcheck_asks_ctr_version() -> None:
    healthcheck = _service("containerd")["healthcheck"]
    words = _healthcheck_words(healthcheck["test"])
    assert words[0] == "ctr"
    assert "version" in words
    address = _config_args(_dockerfile("containerd"))["--address"]
    assert words[words.index("--address") + 1] == address
    for key in ("interval", "timeout", "retries"):
        assert key in healthcheck


def test_socket_directory_is_shared_and_matches_address() -> None:
    options = _config_args(_dockerfile("containerd"))
    address = options["--address"]
    socket_dir = os.path.dirname(address)
    assert os.path.basename(address) == SOCKET_NAME

    daemon_mounts = _mounts("containerd")
    test_mounts = _mounts("tests")
    assert socket_dir in daemon_mounts
    assert _is_named(daemon_mounts[socket_dir])
    assert test_mounts.get(socket_dir) == daemon_mounts[socket_dir]
    assert _environment("tests")["PYCTRD_TEST_ADDRESS"] == address

    config = tomllib.loads(
        daemon_config(root=options["--root"], state=options["--state"], address=address, major=1)
    )
    assert config["grpc"]["address"] == address


def test_containerd_root_is_a_named_volume() -> None:
    # Overlay snapshots on the container's own overlay root fail: the root must be a volume.
    root = _config_args(_dockerfile("containerd"))["--root"]
    mounts = _mounts("containerd")
    assert root in mounts
    assert _is_named(mounts[root])


def test_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    used = {
        source
        for name in _compose()["services"]
        for source in _mounts(name).values()
        if _is_named(source)
    }
    assert used
    assert used <= declared


def test_tests_wait_for_healthy_containerd() -> None:
    depends_on = _service("tests")["depends_on"]
    assert isinstance(depends_on, dict)
    assert depends_on["containerd"]["condition"] == "service_healthy"


def test_tests_image_runs_the_wait_script() -> None:
    script = ROOT / "docker" / "run-tests.sh"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "version.get()" in text
    assert "tests/integration" in text
    cmd = [args for ins, args in _instructions(_dockerfile("tests")) if ins == "CMD"]
    assert len(cmd) == 1
    assert "run-tests.sh" in cmd[0]


@pytest.mark.parametrize(("major", "schema"), [(1, 2), (2, 3)])
def test_generated_config_is_unix_socket_only(major: int, schema: int) -> None:
    options = _config_args(_dockerfile("containerd"))
    address = options["--address"]
    config = tomllib.loads(
        daemon_config(
            root=options["--root"], state=options["--state"], address=address, major=major
        )
    )
    assert config["version"] == schema
    assert config["root"] == options["--root"]
    assert config["state"] == options["--state"]
    assert config["grpc"]["address"] == address
    assert "tcp_address" not in config["grpc"]
    assert "address" not in config.get("debug", {})
    assert "address" not in config.get("metrics", {})
    for path, value in _walk(config):
        assert "tcp" not in path.lower(), path
        if path.endswith("address"):
            assert isinstance(value, str)
            assert value.startswith(address), (path, value)
    assert CRI_PLUGINS[major] <= set(config["disabled_plugins"])
