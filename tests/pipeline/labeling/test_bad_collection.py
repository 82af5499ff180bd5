"""A collection with bad input everywhere (a truncated SA-1B tar, a tar with hostile members, a
folder with a GIF, a text file and broken images), taken through the whole product: labeling on a
real local Ray cluster, review ingest into FiftyOne on the bundled MongoDB, and export. One row per
image, skipped files counted in the summary, and review and export run to the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import schemas
from pipeline.labeling.config import LabelJobConfig
from pipeline.labeling.job import run_label_job
from pipeline.sources.decode import decode_image
from pipeline.vocabulary import Vocabulary
from tests.pipeline.badinputs import build_bad_corpus

VOCABULARY = Vocabulary.from_lists(things=["robot", "car"], stuff=["sky"], parts=["head"])


def test_gif_is_labeled_by_its_first_frame(tmp_path):
    corpus = build_bad_corpus(tmp_path)
    image = decode_image((corpus.folder / "anim.gif").read_bytes())
    assert image.shape == (24, 32, 3)
    assert np.array_equal(image[0, 0], [255, 0, 0])  # the red first frame, not the blue second


def test_bad_collection_is_labeled_reviewed_and_exported(
    ray_local, fiftyone_db, dataset_name, tmp_path
):
    from jobs import export as export_job
    from jobs import review as review_job
    from pipeline.review.fields import ERROR_TAG, MEDIA_ERROR_TAG

    corpus = build_bad_corpus(tmp_path / "corpus")
    out = tmp_path / "labels"
    config = LabelJobConfig(
        inputs=tuple(corpus.inputs),
        output=str(out),
        vocabulary_json=VOCABULARY.to_json(),
        checkpoint="random:tiny",
        batch_size=4,
        cpus_per_actor=0.5,
        folder_shard_size=8,
    )
    summary = run_label_job(config, progress=False)

    # labeling: one row per image, none lost, none twice; the GIF is an ok row
    rows = []
    for path in sorted(out.glob("*.parquet")):
        table, _ = schemas.read_parquet(path)
        schemas.validate_table(table)
        rows.extend(table.to_pylist())
    keys = [(r["shard"], r["image_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(corpus.expected)
    gif = next(r for r in rows if r["image_id"] == "anim.gif")
    assert (gif["status"], gif["height"], gif["width"]) == ("ok", 24, 32)
    n_ok = sum(e.status == "ok" for e in corpus.expected)
    assert (summary.images_ok, summary.images_error) == (n_ok, len(rows) - n_ok)

    # the summary counts what the folder source skipped, by reason, with the paths
    on_disk = json.loads((out / "_summary.json").read_text())
    assert summary.skipped == on_disk["skipped"] == corpus.skipped == {"not an image": 1}
    assert on_disk["runs"][-1]["skipped_examples"] == {
        "not an image": [f"{corpus.folder}/notes.txt"]
    }

    # review: the whole output is ingested; the member cut off by the truncation is a sample
    # with a media error, not a crash
    media = tmp_path / "media"
    argv = ["--labels", str(out), "--dataset", dataset_name, "--media-dir", str(media)]
    assert review_job.main(argv) == 0
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert len(dataset) == len(rows)
    by_id = dict(zip(*dataset.values(["image_id", "media_error"])))
    assert "truncated" in dict(zip(*dataset.values(["image_id", "label_error"])))["sa_12"]
    assert "cannot read tar" in by_id["sa_12"] and "sa_000001.tar" in by_id["sa_12"]
    assert by_id["sa_10"] is None and by_id["anim.gif"] is None
    tags = dataset.count_sample_tags()
    assert tags[ERROR_TAG] == len(rows) - n_ok
    media_errors = dataset.match_tags(MEDIA_ERROR_TAG)
    assert "sa_12" in media_errors.values("image_id")
    assert set(media_errors.values("image_id")) <= {e.image_id for e in corpus.expected}
    for path in dataset.match_tags(MEDIA_ERROR_TAG, bool=False).values("filepath"):
        assert Path(path).is_file(), path
    assert not corpus.outside.exists()
    assert review_job.main(argv) == 0  # a second ingest goes through as well
    assert len(dataset) == len(rows)

    # export: from the label files and from the dataset, every format, to the end
    for source in (["--labels", str(out)], ["--dataset", dataset_name]):
        for fmt in ("coco", "coco-panoptic", "parquet"):
            target = tmp_path / "export" / source[0].strip("-") / fmt
            assert export_job.main([*source, "--format", fmt, "--output", str(target)]) == 0
            assert any(target.iterdir())
        exported, _ = schemas.read_parquet(target / "labels.parquet")
        assert exported.num_rows == len(rows)
        coco = json.loads(
            (tmp_path / "export" / source[0].strip("-") / "coco" / "instances.json").read_text()
        )
        assert len(coco["images"]) == n_ok
