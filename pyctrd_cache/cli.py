"""The `pyctrd-cache` command.

Exit status: 0 success, 1 the operation failed (one line on stderr, no traceback, control
characters escaped: the text may come from a registry), 2 usage (one line on stderr), 130
interrupted (SIGINT), 143 terminated (SIGTERM). A signal ends the command the way an error
does: partial work is rolled back and a private containerd the command started is stopped.

Sizes print in decimal units and ages in words, as `buildctl du` prints them; JSON output
gives sizes in bytes and times in RFC 3339 (UTC), with the same keys every time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Final, NoReturn

from ._progress import PROGRESS_MODES, human_duration, human_size, progress_bar
from ._units import parse_duration
from ._version import __version__
from .blobs import compression_of
from .client import DEFAULT_ADDRESS, Client, validate_namespace
from .compression import Compression
from .embedded import EmbeddedContainerd
from .errors import CacheError, UnavailableError, UnimplementedError
from .manager import DEFAULT_NAMESPACE, Manager, default_state_dir
from .types import CachePolicy, PrunePolicy, UsageInfo
from .usage_filters import FIELDS, compile_filters

if TYPE_CHECKING:
    from .refs import ImmutableRef

PROG: Final = "pyctrd-cache"
_log = logging.getLogger(__name__)


def one_line(message: str) -> str:
    """The message's non-empty lines, stripped and joined with "; "."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


_SIZE_RE: Final = re.compile(
    r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[kmgtpe]?)(?P<binary>i?)(?P<b>b?)\s*",
    re.IGNORECASE,
)
_SIZE_PREFIXES: Final = "kmgtpe"


def parse_size(text: str) -> int:
    """Bytes from `100`, `100B`, `512k`, `10GB`, `10GiB`, `1.5g`, in any case, read as docker
    and buildx read sizes (go-units `RAMInBytes`): every unit is binary, so `10GB` and
    `10GiB` are both 10 * 1024**3 bytes. Fractions of a byte are dropped.

    `ValueError` on anything else.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None or (m["binary"] and not m["prefix"]):
        raise ValueError(f"invalid size {text!r} (expected bytes, or e.g. 10GB, 512MiB, 1.5g)")
    power = _SIZE_PREFIXES.index(m["prefix"].lower()) + 1 if m["prefix"] else 0
    return int(Decimal(m["number"]) * 1024**power)


def _argument_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def split_layout(text: str) -> tuple[str, str | None]:
    """`LAYOUT[:TAG]`: split at the last ':' only when what follows it has no '/', since a
    path may contain ':'. An empty tag is no tag."""
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag or not path:
        return text, None
    return path, tag or None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="BuildKit's layer cache manager on a real containerd.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--address",
        default=os.environ.get("CONTAINERD_ADDRESS") or None,
        help="containerd's socket (default: $CONTAINERD_ADDRESS, else "
        f"{DEFAULT_ADDRESS} if it exists, else a private containerd; a socket that exists "
        "and does not answer is an error)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
        help="containerd namespace of the records (default: $CONTAINERD_NAMESPACE, else "
        "%(default)s)",
    )
    parser.add_argument(
        "--snapshotter",
        default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs",
        help="snapshotter (default: $CONTAINERD_SNAPSHOTTER, else overlayfs; now %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        type=pathlib.Path,
        default=default_state_dir(),
        help="the metadata store's directory, the same as Manager.open(state_dir=...) "
        "(default: $PYCTRD_CACHE_STATE_DIR, else $XDG_STATE_HOME/pyctrd-cache, else "
        "~/.local/state/pyctrd-cache; now %(default)s)",
    )
    parser.add_argument(
        "--lock-timeout",
        type=_argument_type(parse_duration),
        default=parse_duration(os.environ.get("PYCTRD_CACHE_LOCK_TIMEOUT") or "60s"),
        metavar="DURATION",
        help="how long to wait while another process holds the state directory "
        "exclusively (a single-process version, or its brief migration or repair; other "
        "jobs never make a command wait), e.g. 60s, 5m, 0 to fail at once (default: "
        "$PYCTRD_CACHE_LOCK_TIMEOUT, else 60s)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use the private containerd (started for the command unless already running), "
        "even when a system one answers; --address is then ignored",
    )
    parser.add_argument(
        "--containerd-root",
        type=pathlib.Path,
        metavar="DIR",
        help="the private containerd's directory (default: STATE_DIR/containerd)",
    )
    parser.add_argument(
        "--containerd-binary",
        default="containerd",
        help="the containerd the private daemon runs (default: %(default)s)",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="open a damaged metadata store by giving up the records it lost",
    )
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="transfer progress on stderr: tty (a live line), plain (one line per event, for "
        "logs), quiet; auto is tty on a terminal, else plain (default: %(default)s)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log the library's decisions on stderr (retries, fallbacks, repairs at open, "
        "collections, variants made)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="the daemon's version and snapshotters")
    _format_option(info)

    du = commands.add_parser("du", help="disk usage, one row per record, and totals")
    du.add_argument("-v", "--verbose", action="store_true", help="every field of every record")
    _filter_option(du)
    _format_option(du)

    prune = commands.add_parser(
        "prune",
        help="remove unused records and list what was freed",
        description="Removes unused records, least recently used first, and lists them. "
        "Sizes are binary as in docker and buildx: 10GB is 10GiB.",
    )
    prune.add_argument(
        "-a", "--all", action="store_true", help="internal, frontend and shared records too"
    )
    prune.add_argument(
        "--keep-duration",
        type=_argument_type(parse_duration),
        metavar="DURATION",
        help="keep records used within this long (e.g. 48h, 1h30m, 2d)",
    )
    sizes = {
        "--reserved-space": "remove least recently used records only down to this total "
        "(e.g. 10GB)",
        "--keep-storage": "buildx's older name for --reserved-space",
        "--max-used-space": "remove least recently used records until the cache takes at most this",
        "--min-free-space": "remove least recently used records while the file system of "
        "containerd's snapshots has less than this free",
    }
    for flag, text in sizes.items():
        prune.add_argument(
            flag, type=_argument_type(parse_size), default=0, metavar="SIZE", help=text
        )
    prune.add_argument(
        "-v", "--verbose", action="store_true", help="every field of every removed record"
    )
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be removed and the space it would free, removing nothing",
    )
    _filter_option(prune, prune=True)
    _format_option(prune)

    ls = commands.add_parser(
        "ls", help="one line per record: id, size (- if not measured yet), use, description"
    )
    ls.add_argument("-q", "--quiet", action="store_true", help="ids only")
    _format_option(ls)
    inspect = commands.add_parser("inspect", help="one record's metadata")
    inspect.add_argument("id", metavar="ID", help="the record's id")
    inspect.add_argument(
        "--format", choices=["table", "json"], default="json", help="(default: %(default)s)"
    )

    import_ = commands.add_parser(
        "import", help="a directory or a tar (plain, gzip, zstd) becomes a committed record"
    )
    import_.add_argument(
        "path", type=pathlib.Path, metavar="PATH", help="a directory, or a tar (plain, gzip, zstd)"
    )
    import_.add_argument("--parent", metavar="ID", help="the record to build on")
    import_.add_argument("--description", metavar="D", help="the record's description")
    import_.add_argument(
        "--retain", action="store_true", help="cache policy RETAIN instead of DEFAULT"
    )

    export = commands.add_parser("export", help="write a record's chain as an OCI image layout")
    export.add_argument("id", metavar="ID", help="the top record of the chain")
    export.add_argument(
        "--oci-layout",
        type=pathlib.Path,
        required=True,
        metavar="DIR",
        help="the layout to write, created if missing; other tags in it are kept",
    )
    _compression_option(export)
    export.add_argument(
        "--force-compression",
        action="store_true",
        help="convert layers whose blobs use another compression",
    )
    export.add_argument("--tag", metavar="T", help="the tag to write (default: latest)")
    _format_option(export)

    push = commands.add_parser(
        "push",
        help="push a record's chain as an image to a registry or an OCI layout; "
        "prints the manifest digest",
    )
    push.add_argument("id", metavar="ID", help="the top record of the chain")
    push.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG] or oci-layout:DIR[:TAG]")
    _compression_option(push)
    push.add_argument(
        "--force-compression",
        action="store_true",
        help="convert layers whose blobs use another compression",
    )
    _insecure_option(push)
    _format_option(push)

    pull = commands.add_parser(
        "pull",
        help="register an image's layers (registry or OCI layout) as (lazy) records; "
        "prints the top one",
    )
    pull.add_argument(
        "layout", metavar="REF", help="HOST[:PORT]/REPO[:TAG|@DIGEST], oci-layout:DIR[:TAG] or DIR"
    )
    pull.add_argument("--extract", action="store_true", help="pull and unpack the layers now")
    _insecure_option(pull)

    commands.add_parser("containerd", help="run the private containerd in the foreground")

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (needs the completion extra: "
        "pip install 'pyctrd-cache[completion]')",
        description="Prints a completion script; e.g. for bash: "
        "pyctrd-cache completion bash > /etc/bash_completion.d/pyctrd-cache",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell")
    return parser


def _compression_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default=Compression.GZIP.value,
        help="the layers' compression; without --force-compression a blob already made in "
        "another one is used as it is (default: %(default)s)",
    )


def _insecure_option(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that may talk to a registry."""
    parser.add_argument(
        "--insecure", action="store_true", help="plain HTTP to a registry on a loopback host"
    )
    parser.add_argument(
        "--plain-http",
        action="store_true",
        help="plain HTTP to the registry named, on any host (e.g. a CI job's service "
        "container); credentials then cross the network in clear",
    )
    parser.add_argument(
        "--ca-file",
        type=pathlib.Path,
        metavar="PEM",
        help="certificate authorities to trust besides the system's (default: the system's "
        "trust store only)",
    )
    parser.add_argument(
        "--timeout",
        type=_argument_type(_seconds),
        metavar="SECONDS",
        help="seconds a registry answer's body may take once its headers arrived; a blob "
        "also gets its size at 64 KiB/s (default: $PYCTRD_CACHE_HTTP_TIMEOUT, else 30)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid timeout {text!r} (expected seconds)") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"invalid timeout {text!r} (expected a positive number of seconds)")
    return value


OCI_LAYOUT_PREFIX: Final = "oci-layout:"


def layout_of(text: str) -> tuple[str, str | None] | None:
    """`(DIR, TAG)` when `text` names an OCI layout (`oci-layout:DIR[:TAG]`, or a path that
    is not a registry reference: it starts with `/` or `.`, or its first component names
    no host), else None (a registry reference)."""
    if text.startswith(OCI_LAYOUT_PREFIX):
        return split_layout(text.removeprefix(OCI_LAYOUT_PREFIX))
    first, slash, _ = text.partition("/")
    if (
        text.startswith((".", "/"))
        or not slash
        or not ("." in first or ":" in first or first == "localhost")
    ):
        return split_layout(text)
    return None


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="json: one document with the same keys every time, including the daemon used "
        "(default: %(default)s)",
    )


def _filter_option(parser: argparse.ArgumentParser, *, prune: bool = False) -> None:
    parser.add_argument(
        "--filter",
        action="append",
        metavar="F",
        help=f"containerd filter on {', '.join(FIELDS)} (unknown fields are refused); "
        "clauses joined by ',' are ANDed, repeated filters are ORed"
        + ("; prune also takes until=DURATION, keeping records used within it" if prune else ""),
    )


@dataclass(frozen=True)
class Target:
    """Where the command's containerd is, and whether it is the private one."""

    address: str
    embedded: bool


def _embedded_daemon(args: argparse.Namespace) -> EmbeddedContainerd:
    root = args.containerd_root or args.state_dir / "containerd"
    return EmbeddedContainerd(root, args.containerd_binary)


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
    """The daemon to talk to: the private one with --embedded; else the one asked for; else
    the default socket if it exists (an error if it does not answer); else the private one,
    started under the state directory unless it already runs."""
    use_embedded = args.embedded or (
        not args.address
        and not os.path.exists(DEFAULT_ADDRESS)
        and shutil.which(args.containerd_binary) is not None
    )
    if not use_embedded:
        yield Target(args.address or DEFAULT_ADDRESS, embedded=False)
        return
    daemon = _embedded_daemon(args)
    if _answers(daemon.address):
        print(f"{PROG}: using the private containerd at {daemon.address}", file=sys.stderr)
        yield Target(daemon.address, embedded=True)
        return
    print(f"{PROG}: starting a private containerd under {daemon.root_dir}", file=sys.stderr)
    with daemon:
        yield Target(daemon.address, embedded=True)


@dataclass
class _Opened:
    """The command's manager and the daemon it runs on."""

    cm: Manager
    target: Target

    def daemon(self) -> dict[str, object]:
        """The `daemon` object of every JSON document."""
        return {
            "address": self.target.address,
            "embedded": self.target.embedded,
            "version": self.cm.containerd_version,
        }


@contextlib.contextmanager
def _opened(args: argparse.Namespace) -> Iterator[_Opened]:
    """The cache manager on the command's daemon, on the state directory itself."""
    with (
        _target(args) as target,
        Manager.open(
            target.address,
            namespace=args.namespace,
            snapshotter=args.snapshotter,
            state_dir=args.state_dir,
            repair=args.repair,
            lock_timeout=args.lock_timeout.total_seconds(),
        ) as cm,
    ):
        yield _Opened(cm, target)


@contextlib.contextmanager
def _manager(args: argparse.Namespace) -> Iterator[Manager]:
    with _opened(args) as opened:
        yield opened.cm


# Output helpers.


def _rfc3339(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _jsonable(value: object) -> object:
    """Dataclasses as objects, enums by value, datetimes in RFC 3339, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _jsonable_dict(value: object) -> dict[str, object]:
    document = _jsonable(value)
    assert isinstance(document, dict)
    return document


def _usage_json(u: UsageInfo) -> dict[str, object]:
    return {
        "id": u.id,
        "mutable": u.mutable,
        "in_use": u.in_use,
        "size": u.size,
        "parents": list(u.parents),
        "created_at": _rfc3339(u.created_at),
        "last_used_at": _rfc3339(u.last_used_at),
        "usage_count": u.usage_count,
        "description": u.description,
        "record_type": u.record_type.value,
        "shared": u.shared,
    }


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2))


def _by_creation(created_at: datetime | None, record_id: str) -> tuple[float, str]:
    return (created_at.timestamp() if created_at else 0.0, record_id)


def _ago(when: datetime | None) -> str:
    if when is None:
        return ""
    return human_duration(datetime.now(UTC) - when) + " ago"


def _printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped, so it stays on one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _bool(value: bool) -> str:
    return "true" if value else "false"


_ROW: Final = "{:<27}{:<13}{:<11}{}"


def _table_header() -> str:
    return _ROW.format("ID", "RECLAIMABLE", "SIZE", "LAST ACCESSED")


def _table_row(u: UsageInfo) -> str:
    """A `buildctl du` row: a mutable record's id and a shared record's size end in '*'."""
    return _ROW.format(
        u.id + ("*" if u.mutable else ""),
        _bool(not u.in_use),
        human_size(u.size) + ("*" if u.shared else ""),
        _ago(u.last_used_at),
    ).rstrip()


def _key_value(key: str, value: object) -> str:
    return f"{key + ':':<16}{value}".rstrip()


def _verbose_block(u: UsageInfo) -> list[str]:
    return [
        _key_value("ID", u.id),
        _key_value("Parents", ";".join(u.parents)),
        _key_value("Created at", _rfc3339(u.created_at) or ""),
        _key_value("Mutable", _bool(u.mutable)),
        _key_value("Reclaimable", _bool(not u.in_use)),
        _key_value("Shared", _bool(u.shared)),
        _key_value("Size", human_size(u.size)),
        _key_value("Description", _printable(u.description)),
        _key_value("Usage count", u.usage_count),
        _key_value("Last used", _ago(u.last_used_at)),
        _key_value("Type", u.record_type.value),
        "",
    ]


@dataclass(frozen=True)
class _Totals:
    """`buildctl du`'s summary: sizes of every record, of the unused, of the shared ones."""

    total: int
    reclaimable: int
    shared: int

    @classmethod
    def of(cls, usage: Sequence[UsageInfo]) -> _Totals:
        measured = [u for u in usage if u.size > 0]
        return cls(
            total=sum(u.size for u in measured),
            reclaimable=sum(u.size for u in measured if not u.in_use),
            shared=sum(u.size for u in measured if u.shared),
        )


# Commands.


def _info(args: argparse.Namespace) -> int:
    with _target(args) as target, Client(target.address, namespace=args.namespace) as client:
        version = client.check(snapshotter=args.snapshotter)
        snapshotters = client.introspection.snapshotters()
        usable = sorted(p.id for p in snapshotters if p.ok)
        if args.format == "json":
            document = {
                "daemon": {
                    "address": target.address,
                    "embedded": target.embedded,
                    "version": version.version,
                },
                "address": target.address,
                "embedded": target.embedded,
                "namespace": args.namespace,
                "version": version.version,
                "revision": version.revision,
                "snapshotter": args.snapshotter,
                "snapshotters": usable,
            }
            _print_json(document)
        else:
            revision = f" (revision {version.revision})" if version.revision else ""
            print(f"containerd {version.version}{revision} at {target.address}")
            print(f"namespace:    {args.namespace}")
            marked = [f"{s} (in use)" if s == args.snapshotter else s for s in usable]
            print(f"snapshotters: {', '.join(marked)}")
    return 0


def _du(args: argparse.Namespace) -> int:
    filter_strings = args.filter or []
    compile_filters(filter_strings)
    with _opened(args) as opened:
        usage = sorted(
            opened.cm.disk_usage(filters=filter_strings),
            key=lambda u: _by_creation(u.created_at, u.id),
        )
        metadata_size = opened.cm.metadata_size()
    totals = _Totals.of(usage)
    if args.format == "json":
        _print_json(
            {
                "daemon": opened.daemon(),
                "records": [_usage_json(u) for u in usage],
                "total": totals.total,
                "reclaimable": totals.reclaimable,
                "shared": totals.shared,
                "metadata_size": metadata_size,
            }
        )
        return 0
    if args.verbose:
        lines = [line for u in usage for line in _verbose_block(u)]
    else:
        lines = [_table_header(), *(_table_row(u) for u in usage), ""]
    lines += [
        _key_value("Shared", human_size(totals.shared)),
        _key_value("Private", human_size(totals.total - totals.shared)),
        _key_value("Reclaimable", human_size(totals.reclaimable)),
        _key_value("Total", human_size(totals.total)),
        _key_value("Metadata store", human_size(metadata_size)),
    ]
    print("\n".join(lines))
    return 0


def _prune(args: argparse.Namespace) -> int:
    """Lists the removed records in the order they went (children before parents)."""
    filter_strings = args.filter or []
    compile_filters(filter_strings, prune=True)
    policy = PrunePolicy(
        filters=tuple(filter_strings),
        all=args.all,
        keep_duration=args.keep_duration,
        reserved_space=max(args.reserved_space, args.keep_storage),
        max_used_space=args.max_used_space,
        min_free_space=args.min_free_space,
    )
    table = args.format == "table"
    printed = False

    def show(info: UsageInfo) -> None:
        nonlocal printed
        if args.verbose:
            print("\n".join(_verbose_block(info)), flush=True)
            return
        if not printed:
            print(_table_header())
            printed = True
        print(_table_row(info), flush=True)

    with _opened(args) as opened:
        removed = opened.cm.prune(policy, on_removed=show if table else None, dry_run=args.dry_run)
    total = sum(u.size for u in removed if u.size > 0)
    if table:
        label = "Would free" if args.dry_run else "Total"
        print(_key_value(label, human_size(total)))
    else:
        document: dict[str, object] = {
            "daemon": opened.daemon(),
            "removed": [_usage_json(u) for u in removed],
            "total": total,
        }
        if args.dry_run:
            document["dry_run"] = True
        _print_json(document)
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _opened(args) as opened:
        records = opened.cm.records()
    if args.format == "json":
        _print_json(
            {
                "daemon": opened.daemon(),
                "records": [{**_jsonable_dict(r.info), "in_use": r.in_use} for r in records],
            }
        )
        return 0
    for record in records:
        info = record.info
        if args.quiet:
            print(info.id)
            continue
        size = human_size(info.size) if info.size is not None else "-"
        use = "in-use" if record.in_use else "unused"
        print(f"{info.id:<27}{size:<11}{use:<8}{_printable(info.description)}".rstrip())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with _opened(args) as opened:
        info = opened.cm.info(args.id)
    if args.format == "json":
        _print_json({**_jsonable_dict(info), "daemon": opened.daemon()})
        return 0
    for key, value in _jsonable_dict(info).items():
        shown = "" if value is None else value
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            shown = ", ".join(f"{k}={v}" for k, v in value.items())
        print(_key_value(key.replace("_", " ").capitalize(), _printable(str(shown))))
    return 0


def _import(args: argparse.Namespace) -> int:
    from . import oci

    policy = CachePolicy.RETAIN if args.retain else CachePolicy.DEFAULT
    with _manager(args) as cm, progress_bar(sys.stderr, args.progress) as progress:
        parent: ImmutableRef | None = None
        if args.parent:
            parent = cm.get(args.parent)
        try:
            ref = oci.import_path(
                cm,
                args.path,
                parent=parent,
                description=args.description,
                cache_policy=policy,
                progress=progress,
            )
        finally:
            if parent is not None:
                parent.release()
        record_id = ref.id
        ref.release()
    print(record_id)
    return 0


def _export(args: argparse.Namespace) -> int:
    return _send(args, layout=(args.oci_layout, args.tag))


def _push(args: argparse.Namespace) -> int:
    layout = layout_of(args.ref) if args.ref.startswith(OCI_LAYOUT_PREFIX) else None
    return _send(args, layout=layout)


def _send(args: argparse.Namespace, *, layout: tuple[str | pathlib.Path, str | None] | None) -> int:
    """Writes record `args.id` as an image into `layout` (directory, tag), or without one
    pushes it to the registry reference `args.ref`; prints the manifest digest."""
    from . import oci, registry

    compression = Compression(args.compression)
    with _opened(args) as opened, progress_bar(sys.stderr, args.progress) as progress:
        ref = opened.cm.get(args.id)
        try:
            if layout is not None:
                manifest = oci.export_layout(
                    ref,
                    layout[0],
                    compression=compression,
                    force_compression=args.force_compression,
                    tag=layout[1],
                    progress=progress,
                )
            else:
                manifest = registry.push(
                    ref,
                    args.ref,
                    compression=compression,
                    force_compression=args.force_compression,
                    insecure=args.insecure,
                    plain_http=args.plain_http,
                    ca_file=args.ca_file,
                    timeout=args.timeout,
                    progress=progress,
                )
            # The same request serves the same layers again, without converting anything.
            layers = ref.get_remote(
                compression=compression, force_compression=args.force_compression
            ).descriptors
        finally:
            ref.release()
    written = [compression_of(d.media_type, d.annotations) for d in layers]
    if args.format == "json":
        # The layers' compressions say what a note says on a terminal.
        _print_json(
            {
                "daemon": opened.daemon(),
                "manifest": manifest.digest,
                "layers": [
                    {
                        "digest": d.digest,
                        "media_type": d.media_type,
                        "size": d.size,
                        "compression": c.value,
                    }
                    for d, c in zip(layers, written, strict=True)
                ],
            }
        )
        return 0
    print(manifest.digest)
    other = [c for c in written if c is not compression]
    if other:
        # Without --force-compression a layer keeps the blob it has (BuildKit's rule).
        kinds = ", ".join(sorted({c.value for c in other}))
        print(
            f"{PROG}: note: {len(other)} of {len(written)} layers are {kinds}, not "
            f"{compression.value} (existing blobs are reused; --force-compression converts)",
            file=sys.stderr,
        )
    return 0


def _pull(args: argparse.Namespace) -> int:
    from . import oci, registry

    layout = layout_of(args.layout)
    with _manager(args) as cm, progress_bar(sys.stderr, args.progress) as progress:
        if layout is not None:
            ref = oci.pull_layout(cm, *layout, extract=args.extract, progress=progress)
        else:
            ref = registry.pull(
                cm,
                args.layout,
                insecure=args.insecure,
                plain_http=args.plain_http,
                ca_file=args.ca_file,
                timeout=args.timeout,
                extract=args.extract,
                progress=progress,
            )
        record_id = ref.id
        ref.release()
    print(record_id)
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


def _completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise UnimplementedError(
            "shell completion needs the completion extra: pip install 'pyctrd-cache[completion]'"
        ) from None
    print(shtab.complete(_parser(), shell=args.shell))
    return 0


COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "info": _info,
    "du": _du,
    "prune": _prune,
    "ls": _ls,
    "inspect": _inspect,
    "import": _import,
    "export": _export,
    "push": _push,
    "pull": _pull,
    "containerd": _containerd,
    "completion": _completion,
}


def _fail(message: str) -> int:
    print(f"{PROG}: error: {_printable(one_line(message))}", file=sys.stderr)
    return 1


class _Signalled(BaseException):
    """SIGTERM or SIGINT arrived: the command unwinds as on an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame: object) -> None:
    # The first signal unwinds the command; later ones must not cut its clean-up short.
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise _Signalled(signum)


def _setup_logging(debug: bool) -> None:
    """The library's log on stderr: warnings (a wait for the state directory, a store moved)
    always, everything with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("pyctrd_cache")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.debug)
    if threading.current_thread() is threading.main_thread() and args.command != "containerd":
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _on_signal)
    try:
        validate_namespace(args.namespace)
        return COMMANDS[args.command](args)
    except CacheError as err:
        return _fail(str(err))
    except BrokenPipeError:
        # The reader went away (`pyctrd-cache ls | head`): nothing more can be written.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:
        if err.filename is not None:
            return _fail(f"{err.strerror or err}: {err.filename}")
        return _fail(str(err))
    except _Signalled as signalled:
        return 128 + signalled.signum
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # A failure the library did not foresee still ends in the one-line error; the
        # traceback goes to the log.
        _log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected {type(err).__name__}: {err}")


if __name__ == "__main__":
    sys.exit(main())
