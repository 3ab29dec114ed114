"""`Descriptor.from_oci` and `remote_snapshot_labels`, whose results need no daemon."""

from __future__ import annotations

import pytest

from pyctrd_cache import Descriptor, InvalidError, remote_snapshot_labels
from pyctrd_cache._validate import MAX_LABEL

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"
DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
REFERENCE_LABEL = "containerd.io/snapshot/remote/stargz.reference"
TOC = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_from_oci_reads_each_field_and_the_annotations() -> None:
    data = {
        "mediaType": LAYER,
        "digest": digest(1),
        "size": "1234",  # a number given as a string is read as one
        "annotations": {"org.opencontainers.image.title": "layer"},
        "urls": ["ignored"],
    }
    desc = Descriptor.from_oci(data)
    assert desc == Descriptor(LAYER, digest(1), 1234, {"org.opencontainers.image.title": "layer"})
    assert Descriptor.from_oci(desc.to_oci()) == desc


@pytest.mark.parametrize("annotations", [{}, {"annotations": None}, {"annotations": {}}])
def test_from_oci_without_annotations_has_none(annotations: dict[str, object]) -> None:
    desc = Descriptor.from_oci({"mediaType": LAYER, "digest": digest(2), "size": 7, **annotations})
    assert (desc.media_type, desc.digest, desc.size) == (LAYER, digest(2), 7)
    assert dict(desc.annotations) == {}
    assert desc.to_oci() == {"mediaType": LAYER, "digest": digest(2), "size": 7}


@pytest.mark.parametrize("missing", ["mediaType", "digest", "size"])
def test_from_oci_needs_the_three_fields(missing: str) -> None:
    data: dict[str, object] = {"mediaType": LAYER, "digest": digest(3), "size": 1}
    del data[missing]
    with pytest.raises(KeyError, match=missing):
        Descriptor.from_oci(data)


def _layers(count: int) -> list[Descriptor]:
    return [
        Descriptor(
            LAYER,
            digest(i),
            100 + i,
            {
                TOC: digest(1000 + i),
                UNCOMPRESSED_SIZE: str(200 + i),
                "containerd.io/snapshot/custom": f"c{i}",
                "org.opencontainers.image.title": "not passed on",
            },
        )
        for i in range(count)
    ]


def test_labels_name_the_layer_and_the_layers_above_it() -> None:
    layers = _layers(4)
    labels = remote_snapshot_labels("127.0.0.1:5000/team/app:1", layers, 1)
    assert labels == {
        TOC: digest(1001),
        UNCOMPRESSED_SIZE: "201",
        "containerd.io/snapshot/custom": "c1",
        REFERENCE_LABEL: "127.0.0.1:5000/team/app:1",
        DIGEST_LABEL: digest(1),
        LAYERS_LABEL: ",".join(digest(i) for i in (1, 2, 3)),
    }
    assert remote_snapshot_labels("r/a:1", layers, 3)[LAYERS_LABEL] == digest(3)


def test_layers_label_is_cut_to_whole_digests_within_the_label_limit() -> None:
    layers = _layers(150)
    labels = remote_snapshot_labels("r/a:1", layers, 0)
    listed = labels[LAYERS_LABEL].split(",")
    # 71 bytes a digest, one comma between: as many whole digests as fit.
    fit = (MAX_LABEL - len(LAYERS_LABEL) + 1) // (len(digest(0)) + 1)
    assert fit < len(layers) - 50
    assert listed == [digest(i) for i in range(fit)]
    assert len(LAYERS_LABEL) + len(labels[LAYERS_LABEL]) <= MAX_LABEL
    # From further up, the list starts at that layer and is cut the same way.
    assert remote_snapshot_labels("r/a:1", layers, 50)[LAYERS_LABEL].split(",") == [
        digest(i) for i in range(50, 50 + fit)
    ]


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_an_index_out_of_range_is_refused(index: int) -> None:
    with pytest.raises(InvalidError, match=f"layer index {index} is out of range for 3 layers"):
        remote_snapshot_labels("r/a:1", _layers(3), index)


def test_no_layers_is_out_of_range() -> None:
    with pytest.raises(InvalidError, match="out of range for 0 layers"):
        remote_snapshot_labels("r/a:1", [], 0)
