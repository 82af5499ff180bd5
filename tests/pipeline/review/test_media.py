"""Review ingest of rows whose images cannot be read: a member of a cut-off tar, a missing tar, a
missing file, an unreachable URI. Each becomes a per-sample error (tag ``media-error`` and the
reason in ``media_error``), the sample keeps its labels, and the ingest goes on."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import numpy as np

import schemas
from schemas import rle
from tests.pipeline.badinputs import add_member, encode, gradient_rgb


def _row(image_id: str, uri: str) -> dict:
    mask = np.zeros((24, 32), bool)
    mask[4:12, 6:20] = True
    return schemas.make_ok_row(
        image_id=image_id,
        uri=uri,
        shard="s",
        width=32,
        height=24,
        masks=[
            schemas.make_mask(
                mask_id=0, rle=rle.encode(mask), level="instance", label="dog", score=0.9,
                origin="sam",
            )
        ],
        model="hipie:test",
        vocabulary_hash="v",
    )  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _cut_tar(path: Path, jpg: bytes) -> None:
    """sa_1.jpg complete, sa_2.jpg cut inside its data (no sa_3 at all)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "sa_1.jpg", jpg)
        cut = tar.offset + tarfile.BLOCKSIZE + len(jpg) // 2
        add_member(tar, "sa_2.jpg", jpg)
    path.write_bytes(buf.getvalue()[:cut])


def test_unreadable_media_become_tagged_samples_and_ingest_goes_on(
    fiftyone_db, dataset_name, tmp_path
):
    from pipeline.review.fields import MEDIA_ERROR_TAG
    from pipeline.review.ingest import ingest_rows, open_dataset

    jpg = encode(gradient_rgb(24, 32), "JPEG")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpg)
    cut = tmp_path / "sa_000001.tar"
    _cut_tar(cut, jpg)
    url = f"http://127.0.0.1:{_closed_port()}/photo.jpg"
    rows = [
        _row("plain", str(photo)),
        _row("member-ok", f"tar://{cut}#sa_1.jpg"),
        _row("member-cut", f"tar://{cut}#sa_2.jpg"),
        _row("member-absent", f"tar://{cut}#sa_3.jpg"),
        _row("tar-missing", f"tar://{tmp_path}/sa_000009.tar#sa_1.jpg"),
        _row("file-missing", str(tmp_path / "gone.jpg")),
        _row("unreachable", url),
    ]
    dataset = open_dataset(dataset_name)
    result = ingest_rows(dataset, rows, media_dir=tmp_path / "media")

    assert (result.added, result.media_errors) == (7, 5)
    keys, tags, reasons, paths, labels = dataset.values(
        ["image_id", "tags", "media_error", "filepath", "instances.detections.label"]
    )
    by_id = {k: (t, r, p, lab) for k, t, r, p, lab in zip(keys, tags, reasons, paths, labels)}
    for key in ("plain", "member-ok"):
        assert by_id[key][:2] == ([], None), by_id[key]
        assert Path(by_id[key][2]).read_bytes() == jpg
    expected = {
        "member-cut": "cannot read tar",  # tarfile: unexpected end of data, or cut off
        "member-absent": "cannot read tar",  # the stream ended at the cut before reaching it
        "tar-missing": "cannot read tar",
        "file-missing": "image file not found",
        "unreachable": f"cannot fetch {url}",
    }
    for key, reason in expected.items():
        tag_list, why, path, _ = by_id[key]
        assert tag_list == [MEDIA_ERROR_TAG] and reason in why, (key, why)
        assert "\n" not in why
        assert not Path(path).exists()
    # every sample keeps its labels, readable media or not
    assert all(lab == ["dog"] for *_, lab in by_id.values())
    # nothing half-written is left in the media folder
    media = sorted(p.name for p in (tmp_path / "media").rglob("*") if p.is_file())
    assert media == ["sa_1.jpg"]

    # a second ingest of the same rows changes nothing and raises nothing
    again = ingest_rows(dataset, rows, media_dir=tmp_path / "media")
    assert (again.added, again.unchanged) == (0, 7)

    # fine-tuning from the dataset takes only the samples that have an image
    from pipeline.finetune.data import training_set_from_dataset

    training = training_set_from_dataset(dataset_name, tag=None)
    assert sorted(r["image_id"] for r in training.rows) == ["member-ok", "plain"]


def test_default_media_dir_is_local_for_labels_in_object_storage(tmp_path, monkeypatch):
    from pipeline.review.ingest import default_media_dir

    labels = tmp_path / "labels"
    labels.mkdir()
    assert default_media_dir(labels) == labels / "media"
    assert default_media_dir(labels / "shard-0.parquet") == labels / "media"
    assert default_media_dir(f"file://{labels}") == labels / "media"
    monkeypatch.setenv("HIPIE_MEDIA_CACHE", str(tmp_path / "cache"))
    s3 = default_media_dir("s3://bucket/run1?endpoint_override=127.0.0.1:9000&scheme=http")
    assert s3.parent == tmp_path / "cache" and len(s3.name) == 16
    assert s3 == default_media_dir("s3://bucket/run1")  # the query (endpoint, keys) is no part
    assert s3 != default_media_dir("s3://bucket/run2")
    monkeypatch.delenv("HIPIE_MEDIA_CACHE")
    assert default_media_dir("gs://b/x").parent == Path.home() / ".cache" / "hipie" / "media"
