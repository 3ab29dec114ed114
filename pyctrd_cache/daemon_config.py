"""containerd's configuration for a daemon that serves the cache, and version parsing.

Dependency-free on purpose: the compose image runs this file as a script at build time
(`python3 daemon_config.py --version-output "$(containerd --version)" ...`), and
`EmbeddedContainerd` imports it, so both daemons get the same configuration.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["daemon_config", "parse_version"]

_VERSION_RE: Final = re.compile(r"\s(?:v)?(\d+)\.(\d+)\.(\d+)")
# The CRI and sandbox plugins need runc, CNI and a kubelet, and devmapper needs a pool;
# the cache needs none of them, and disabling them keeps the daemon's log free of errors.
_DISABLED_PLUGINS: Final = {
    1: ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.devmapper"],
    2: [
        "io.containerd.grpc.v1.cri",
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.podsandbox.controller.v1.podsandbox",
        "io.containerd.grpc.v1.sandbox-controllers",
        "io.containerd.snapshotter.v1.devmapper",
    ],
}


def parse_version(output: str) -> tuple[int, int, int]:
    """(major, minor, patch) from what `containerd --version` prints; ValueError if none."""
    match = _VERSION_RE.search(output)
    if match is None:
        raise ValueError(f"no containerd version in {output.strip()!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def daemon_config(
    *,
    root: str,
    state: str,
    address: str,
    major: int,
    proxy_snapshotters: Mapping[str, str] | None = None,
) -> str:
    """The config file of a containerd `major`.x that serves only the Unix socket `address`
    (no TCP listener) and keeps all its data below `root` and `state`.

    Schema version 2 for containerd 1.x, 3 for 2.x; the CRI plugins are disabled.
    `proxy_snapshotters` maps snapshotter names to the Unix sockets of proxy snapshotters.
    """
    if major not in _DISABLED_PLUGINS:
        raise ValueError(f"unsupported containerd major version {major}")
    disabled = ", ".join(_toml_string(p) for p in _DISABLED_PLUGINS[major])
    return "\n".join(
        [
            f"version = {2 if major == 1 else 3}",
            f"root = {_toml_string(root)}",
            f"state = {_toml_string(state)}",
            f"disabled_plugins = [{disabled}]",
            "",
            "[grpc]",
            f"  address = {_toml_string(address)}",
            "",
            "[ttrpc]",
            f"  address = {_toml_string(address + '.ttrpc')}",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_string(os.path.join(root, 'opt'))}",
            "",
            *(
                line
                for name, socket in sorted((proxy_snapshotters or {}).items())
                for line in (
                    f"[proxy_plugins.{_toml_string(name)}]",
                    '  type = "snapshot"',
                    f"  address = {_toml_string(socket)}",
                    "",
                )
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a containerd config for the cache.")
    parser.add_argument(
        "--version-output", required=True, help="what `containerd --version` printed"
    )
    parser.add_argument("--root", default="/var/lib/containerd")
    parser.add_argument("--state", default="/run/containerd")
    parser.add_argument("--address", default="/run/containerd/containerd.sock")
    args = parser.parse_args()
    major = parse_version(args.version_output)[0]
    print(
        daemon_config(root=args.root, state=args.state, address=args.address, major=major), end=""
    )


if __name__ == "__main__":
    main()
