"""The stargz snapshotter mode (the stargz branches of BuildKit's cache/refs.go and
manager.go, and the snapshot-label hints of its image puller).

With a remote snapshotter, a lazy layer need not be pulled to be mounted: preparing a
snapshot whose labels name the target snapshot (`containerd.io/snapshot.ref`) and where the
layer lives (`containerd.io/snapshot/remote/stargz.reference`, `.digest`, `.layers`) lets the
snapshotter mount the layer from the registry and commit it under the target's name at once;
containerd answers the prepare with "already exists". Snapshots made that way carry the label
`containerd.io/snapshot/remote`, and their records stay lazy: their blobs never reach the
content store.

Rules, as in the seed:
- Only a manager whose snapshotter is named `stargz` works this way.
- Before extracting, the lazy part of the chain is prepared remotely from the parent up; the
  first layer that cannot be (no handler, or the snapshotter made an ordinary snapshot
  instead) ends the walk, and it and every layer above it are pulled and applied as usual.
- For the duration of each call that extracts, mounts or builds on a chain, every remote
  snapshot of the chain carries its handler's snapshot labels and the caller's session ids
  as temporary labels, whose keys end in a suffix unique to the call (so concurrent calls do
  not collide); the call removes them when it ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from .. import _validate
from ..client import Client, Descriptor
from ..errors import AlreadyExistsError, CacheError, InvalidError, NotFoundError

if TYPE_CHECKING:
    from ..remote import DescHandlers
    from .refs import _Record

__all__ = [
    "REMOTE_SNAPSHOT_LABEL",
    "STARGZ_SNAPSHOTTER",
    "remote_snapshot_labels",
]

STARGZ_SNAPSHOTTER: Final = "stargz"
REMOTE_SNAPSHOT_LABEL: Final = "containerd.io/snapshot/remote"
"""Set by a remote snapshotter on the snapshots it mounts from a registry."""
SNAPSHOT_REF_LABEL: Final = "containerd.io/snapshot.ref"
_INHERITED_PREFIX: Final = "containerd.io/snapshot/"
_SESSION_PREFIX: Final = "containerd.io/snapshot/remote/stargz.session."
_REFERENCE_LABEL: Final = "containerd.io/snapshot/remote/stargz.reference"
_DIGEST_LABEL: Final = "containerd.io/snapshot/remote/stargz.digest"
_LAYERS_LABEL: Final = "containerd.io/snapshot/remote/stargz.layers"
_ESTARGZ_ANNOTATIONS: Final = (
    "containerd.io/snapshot/stargz/toc.digest",
    "io.containers.estargz.uncompressed-size",
)

Session = Sequence[str]
"""The caller's session ids (BuildKit's `session.Group`), passed to the snapshotter as
temporary labels; empty when the caller has none."""


log = logging.getLogger("pyctrd_cache.remote_snapshots")


def remote_snapshot_labels(
    image_ref: str, layers: Sequence[Descriptor], index: int
) -> dict[str, str]:
    """The snapshot labels that let a remote snapshotter find layer `index` of `layers`
    (the image's layers, parent first) in the registry `image_ref` names: the layer's own
    snapshot annotations and eStargz annotations, the reference, the layer's digest, and the
    digests of it and the layers above it (as many as fit in one label)."""
    if not 0 <= index < len(layers):
        raise InvalidError(f"layer index {index} is out of range for {len(layers)} layers")
    desc = layers[index]
    labels = inherited_labels(desc.annotations)
    for key in _ESTARGZ_ANNOTATIONS:
        if key in desc.annotations:
            labels[key] = desc.annotations[key]
    labels[_REFERENCE_LABEL] = image_ref
    labels[_DIGEST_LABEL] = desc.digest
    listed = ""
    for layer in layers[index:]:
        longer = f"{listed},{layer.digest}" if listed else layer.digest
        # Fewer neighbours only costs the snapshotter some look-ahead.
        try:
            _validate.label(_LAYERS_LABEL, longer)
        except InvalidError:
            break
        listed = longer
    labels[_LAYERS_LABEL] = listed
    return labels


def inherited_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels containerd passes on to a snapshotter (its FilterInheritedLabels)."""
    inherited = {k: v for k, v in labels.items() if k.startswith(_INHERITED_PREFIX)}
    if SNAPSHOT_REF_LABEL in labels:
        inherited[SNAPSHOT_REF_LABEL] = labels[SNAPSHOT_REF_LABEL]
    return inherited


def _temporary_labels(labels: Mapping[str, str], session: Session, suffix: str) -> dict[str, str]:
    """`labels` with `suffix` appended to every key, and one label per session id."""
    result = {f"{k}.{suffix}": v for k, v in labels.items()}
    for i, session_id in enumerate(session):
        result[f"{_SESSION_PREFIX}{i}.{suffix}"] = session_id
    for key, value in result.items():
        _validate.label(key, value)
    return result


def _chain(rec: _Record) -> list[_Record]:
    recs = []
    current: _Record | None = rec
    while current is not None:
        recs.append(current)
        current = current.parent._rec if current.parent is not None else None
    return recs[::-1]


def is_remote(client: Client, snapshotter: str, name: str) -> bool:
    """Whether the snapshot `name` exists and is a remote one (its layer is read from the
    registry, not from the content store)."""
    try:
        info = client.snapshots(snapshotter).stat(name)
    except NotFoundError:
        return False
    return REMOTE_SNAPSHOT_LABEL in info.labels


def _remove_labels(client: Client, snapshotter: str, name: str, keys: Sequence[str]) -> None:
    """Removes the temporary labels `keys` from `name`; a snapshot gone meanwhile has none."""
    with contextlib.suppress(NotFoundError):
        client.snapshots(snapshotter).update_labels(name, {}, fields=keys)


@contextlib.contextmanager
def remote_labels(rec: _Record | None, dhs: DescHandlers, session: Session) -> Iterator[None]:
    """Labels every remote snapshot of `rec`'s chain that has a handler with the handler's
    snapshot labels and the session ids, under keys unique to this call, for the duration
    of the block (no-op outside the stargz mode or without a record)."""
    if rec is None or rec.core.snapshotter != STARGZ_SNAPSHOTTER:
        yield
        return
    core = rec.core
    client = core.client
    added: list[tuple[str, list[str]]] = []
    try:
        for r in _chain(rec):
            dh = dhs.get(r.md.blob)
            if dh is None or not is_remote(client, core.snapshotter, r.md.snapshot_id):
                continue
            labels = _temporary_labels(inherited_labels(dh.snapshot_labels), session, core.new_id())
            if not labels:
                continue
            client.snapshots(core.snapshotter).update_labels(r.md.snapshot_id, labels)
            added.append((r.md.snapshot_id, list(labels)))
        yield
    finally:
        for name, keys in reversed(added):
            with contextlib.suppress(CacheError):
                _remove_labels(client, core.snapshotter, name, keys)


def prepare_remote(rec: _Record, dhs: DescHandlers, session: Session, leased: Client) -> None:
    """Makes remote snapshots for the lazy part of `rec`'s chain, parent first, until a
    layer cannot be made remotely (see the module's rules); `leased` holds what the prepares
    make until the records' leases, which name the snapshots already, take over."""
    core = rec.core
    sn = leased.snapshots(core.snapshotter)
    for r in _chain(rec):
        snapshot_id = r.md.snapshot_id
        with contextlib.suppress(NotFoundError):
            sn.stat(snapshot_id)
            continue
        dh = dhs.get(r.md.blob)
        if dh is None:
            return
        labels = inherited_labels(dh.snapshot_labels)
        suffix = core.new_id()
        temporary = _temporary_labels(labels, session, suffix)
        labels[SNAPSHOT_REF_LABEL] = snapshot_id
        key = f"tmp-{suffix} {r.md.chain_id}"
        parent = r.parent._rec.md.snapshot_id if r.parent is not None else ""
        try:
            sn.prepare(key, parent, labels={**labels, **temporary})
        except AlreadyExistsError:
            try:
                sn.stat(snapshot_id)
            except NotFoundError:
                return
            # The target is there, prepared remotely: the temporary labels it took over go.
            _remove_labels(leased, core.snapshotter, snapshot_id, list(temporary))
            continue
        except CacheError as err:
            # Any other refusal also leaves this layer to the ordinary path.
            log.info("remote snapshot of %s refused (%s); pulling it instead", snapshot_id, err)
            return
        # The snapshotter made an ordinary active snapshot: this layer, and those above it,
        # are pulled and applied instead.
        log.info("no remote snapshot for %s; pulling and applying from here", snapshot_id)
        with contextlib.suppress(CacheError):
            sn.remove(key)
        return
