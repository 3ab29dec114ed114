"""The `pyctrd-cache` command.

Exit status: 0 success, 1 the operation failed (one line on stderr, no traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from .client import DEFAULT_ADDRESS, Client, validate_namespace
from .embedded import EmbeddedContainerd
from .errors import CacheError, UnavailableError
from .manager import DEFAULT_NAMESPACE, default_state_dir

PROG: Final = "pyctrd-cache"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="BuildKit's layer cache manager on a real containerd."
    )
    parser.add_argument(
        "--address",
        help="containerd socket (default: $CONTAINERD_ADDRESS, else " + DEFAULT_ADDRESS + ")",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
        help="containerd namespace (default: $CONTAINERD_NAMESPACE, else %(default)s)",
    )
    parser.add_argument("--snapshotter", default="overlayfs", help="default: %(default)s")
    parser.add_argument(
        "--state-dir",
        type=pathlib.Path,
        default=default_state_dir(),
        help="metadata and embedded daemon directory (default: %(default)s)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use a private containerd under the state directory",
    )
    parser.add_argument(
        "--containerd-binary",
        default="containerd",
        help="the containerd the embedded daemon runs (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="the daemon's version and snapshotters")
    info.add_argument("--format", choices=["table", "json"], default="table")
    commands.add_parser("containerd", help="run the embedded containerd in the foreground")
    return parser


@dataclass(frozen=True)
class Target:
    """Where the command's containerd is, and whether it is the embedded one."""

    address: str
    embedded: bool


def _embedded_daemon(args: argparse.Namespace) -> EmbeddedContainerd:
    return EmbeddedContainerd(args.state_dir / "containerd", args.containerd_binary)


def _answers(address: str) -> bool:
    if not os.path.exists(address):
        return False
    with Client(address, retry_budget=0.0, timeout=2.0) as client:
        try:
            client.version.get()
        except UnavailableError:
            return False
    return True


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[Target]:
    """The daemon to talk to: the one asked for, else the default one if it answers, else a
    private one under the state directory (reused when already running)."""
    explicit = args.address or os.environ.get("CONTAINERD_ADDRESS")
    use_embedded = args.embedded or (
        not explicit
        and not _answers(DEFAULT_ADDRESS)
        and shutil.which(args.containerd_binary) is not None
    )
    if not use_embedded:
        yield Target(explicit or DEFAULT_ADDRESS, embedded=False)
        return
    daemon = _embedded_daemon(args)
    if _answers(daemon.address):
        print(f"{PROG}: using the private containerd at {daemon.address}", file=sys.stderr)
        yield Target(daemon.address, embedded=True)
        return
    print(f"{PROG}: starting a private containerd under {daemon.root_dir}", file=sys.stderr)
    with daemon:
        yield Target(daemon.address, embedded=True)


def _info(args: argparse.Namespace) -> int:
    with _target(args) as target, Client(target.address, namespace=args.namespace) as client:
        version = client.check(snapshotter=args.snapshotter)
        snapshotters = client.introspection.snapshotters()
        usable = sorted(p.id for p in snapshotters if p.ok)
        if args.format == "json":
            document = {
                "address": target.address,
                "embedded": target.embedded,
                "namespace": args.namespace,
                "version": version.version,
                "revision": version.revision,
                "snapshotter": args.snapshotter,
                "snapshotters": usable,
            }
            print(json.dumps(document, indent=2))
        else:
            revision = f" (revision {version.revision})" if version.revision else ""
            print(f"containerd {version.version}{revision} at {target.address}")
            print(f"namespace:    {args.namespace}")
            marked = [f"{s} (in use)" if s == args.snapshotter else s for s in usable]
            print(f"snapshotters: {', '.join(marked)}")
    return 0


def _containerd(args: argparse.Namespace) -> int:
    daemon = _embedded_daemon(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with daemon:
        assert daemon.version is not None
        print(f"containerd {daemon.version.version} listening on {daemon.address}", flush=True)
        print(f"log: {daemon.log_path}; stop with Ctrl-C", flush=True)
        while not stop.wait(0.5):
            if daemon.pid is None:
                raise CacheError(
                    f"containerd exited; its log {daemon.log_path} ends with:\n{daemon.log_tail()}"
                )
    return 0


COMMANDS: Final = {"info": _info, "containerd": _containerd}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        validate_namespace(args.namespace)
        return COMMANDS[args.command](args)
    except CacheError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
