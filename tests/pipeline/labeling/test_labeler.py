"""The labeler in-process (no Ray): rows from decoded records, and the App. A.8.2 replacement."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest

import schemas
from hipie.synthetic.generator import SceneGenerator, write_sa1b_shard
from pipeline.labeling.config import COUNT, END, LabelJobConfig
from pipeline.labeling.job import read_shard
from pipeline.labeling.labeler import Labeler, replace_classes
from pipeline.labeling.transform import decode_record
from pipeline.masks.sam_json import unpack_sam_masks
from pipeline.sources.listing import list_shards
from pipeline.vocabulary import Vocabulary
from schemas import rle


def _m(mask_id, level, label, parent=None, origin="sam"):
    mask = np.zeros((8, 8), bool)
    mask[mask_id, :] = True
    return schemas.make_mask(
        mask_id=mask_id,
        rle=rle.encode(mask),
        level=level,
        label=label,
        score=0.5,
        origin=origin,
        parent_id=parent,
    )


def test_replace_classes_swaps_sam_masks_of_those_classes_for_hipie_ones():
    sam = [
        _m(0, "instance", "person"),
        _m(1, "part", "person head", parent=0),
        _m(2, "instance", "car"),
        _m(3, "part", "car wheel", parent=2),
        _m(4, "stuff", "sky"),
    ]
    hipie = [
        _m(0, "instance", "person", origin="hipie"),
        _m(1, "part", "person head", parent=0, origin="hipie"),
        _m(2, "subpart", "person eye", parent=1, origin="hipie"),
        _m(3, "instance", "car", origin="hipie"),
        _m(4, "stuff", "sky", origin="hipie"),
    ]
    out = replace_classes(sam, hipie, {"person"})
    got = [(m["mask_id"], m["label"], m["origin"], m["parent_id"]) for m in out]
    assert got == [
        (0, "car", "sam", None),
        (1, "car wheel", "sam", 0),
        (2, "sky", "sam", None),
        (3, "person", "hipie", None),
        (4, "person head", "hipie", 3),
        (5, "person eye", "hipie", 4),
    ]
    assert replace_classes(sam, hipie, set()) == sam


@pytest.fixture(scope="module")
def labeler():
    vocab = Vocabulary.from_lists(things=["robot", "car"], stuff=["sky"], parts=["head", "wheel"])
    config = LabelJobConfig(
        inputs=(), output="unused", vocabulary_json=vocab.to_json(), checkpoint="random:tiny"
    )
    return Labeler(config)


def test_labeler_turns_records_into_schema_rows(labeler, tmp_path):
    tar = tmp_path / "sa_000000.tar"
    write_sa1b_shard(SceneGenerator(seed=3).scenes(0, 1), tar)
    with tarfile.open(tar, "a") as t:  # a corrupt image in the same shard
        info = tarfile.TarInfo("sa_9.jpg")
        info.size = 5
        t.addfile(info, io.BytesIO(b"nope!"))
    shard = list_shards([str(tar)])[0]
    records = [decode_record(r, max_pixels=10**8) for r in read_shard({"index": 0}, shards=[shard])]
    batch = {k: np.array([r[k] for r in records], dtype=object) for k in records[0]}
    table = labeler(batch)

    assert table.num_rows == 3
    rows = table.to_pylist()
    assert [r[END] for r in rows] == [False, False, True]
    assert rows[2][COUNT] == 2
    ok, bad = rows[0], rows[1]
    assert (ok["status"], ok["image_id"]) == ("ok", "sa_1")
    sam = unpack_sam_masks(
        records[0]["sam_counts"], records[0]["sam_meta"], records[0]["height"], records[0]["width"]
    )
    assert len(ok["masks"]) == len(sam) > 0  # one label per SA-1B mask, none dropped
    assert [m["rle"] for m in ok["masks"]] == [m["rle"] for m in sam]
    assert [m["bbox"] for m in ok["masks"]] == [m["bbox"] for m in sam]
    assert {m["origin"] for m in ok["masks"]} == {"sam"}
    assert all(m["level"] in schemas.LEVELS for m in ok["masks"])
    assert (bad["status"], bad["image_id"]) == ("error", "sa_9")
    assert bad["error"].startswith("cannot decode image")
    labels = table.drop_columns([END, COUNT]).slice(0, 2)
    schemas.validate_table(labels.cast(schemas.LABELS_V1))
    assert isinstance(table, pa.Table)


def test_parts_are_labeled_among_their_things_parts(tmp_path):
    """The synthetic vocabulary lists each thing's parts: the shipped model labels scenes (HIPIE
    masks and SA-1B masks) and every part or subpart under an instance is one of its parts."""
    from pipeline.vocabulary import load_vocabulary

    vocab = load_vocabulary("synthetic")
    config = LabelJobConfig(
        inputs=(), output="unused", vocabulary_json=vocab.to_json(), checkpoint="tiny"
    )
    labeler = Labeler(config)
    tar = tmp_path / "sa_000000.tar"
    write_sa1b_shard(SceneGenerator(seed=11).scenes(0, 3), tar)
    shard = list_shards([str(tar)])[0]
    records = [decode_record(r, max_pixels=10**8) for r in read_shard({"index": 0}, shards=[shard])]
    with_sam = {k: np.array([r[k] for r in records], dtype=object) for k in records[0]}
    hipie_only = dict(with_sam, sam_masks=np.array([None] * len(records), dtype=object))
    checked = 0
    for batch in (with_sam, hipie_only):
        rows = [r for r in labeler(batch).to_pylist() if not r[END]]  # END: the shard marker
        assert len(rows) == 3
        for row in rows:
            assert row["status"] == "ok", row["error"]
            by_id = {m["mask_id"]: m for m in row["masks"]}
            for m in row["masks"]:
                owner = schemas.instance_of(m, by_id)
                if m["level"] in ("part", "subpart") and owner and owner["label"] in vocab.things:
                    thing = owner["label"]
                    allowed = {f"{thing} {p}" for p in vocab.parts_of(thing)}
                    assert m["label"] in allowed | {"other"}, (m["label"], thing)
                    checked += 1
    assert checked >= 10  # the shipped model finds parts on these scenes


def test_images_resized_in_the_decode_task_get_labels_at_their_own_size(tmp_path):
    """The decode task ships the image at the model's size: rows keep the image's own size, every
    RLE (SAM's and HIPIE's, upsampled straight to the RLE) is of that size, and the SAM masks are
    the json's."""
    from pipeline.vocabulary import load_vocabulary

    vocab = load_vocabulary("synthetic")
    labeler = Labeler(
        LabelJobConfig(
            inputs=(), output="unused", vocabulary_json=vocab.to_json(), checkpoint="tiny"
        )
    )
    tar = tmp_path / "sa_000000.tar"
    write_sa1b_shard(SceneGenerator(seed=5).scenes(0, 2), tar)
    shard = list_shards([str(tar)])[0]
    records = [
        decode_record(r, max_pixels=10**8, max_side=100)
        for r in read_shard({"index": 0}, shards=[shard])
    ]
    assert records[0]["image"].shape == (100, 100, 3)
    assert (records[0]["height"], records[0]["width"]) == (256, 256)
    with_sam = {k: np.array([r[k] for r in records], dtype=object) for k in records[0]}
    hipie_only = dict(with_sam, sam_counts=np.array([""] * len(records), dtype=object))
    for batch in (with_sam, hipie_only):
        table = labeler(batch)
        rows = [r for r in table.to_pylist() if not r[END]]
        assert [(r["status"], r["width"], r["height"]) for r in rows] == [("ok", 256, 256)] * 2
        for row in rows:
            assert row["masks"] and all(m["rle"]["size"] == [256, 256] for m in row["masks"])
            for m in row["masks"]:
                assert m["area"] == rle.area(m["rle"])
                assert m["bbox"] == rle.bbox(m["rle"])
        schemas.validate_table(table.drop_columns([END, COUNT]).slice(0, 2).cast(schemas.LABELS_V1))
    sam = unpack_sam_masks(records[1]["sam_counts"], records[1]["sam_meta"], 256, 256)
    rows = [r for r in labeler(with_sam).to_pylist() if not r[END]]
    from_sam = [m["rle"] for m in rows[1]["masks"] if m["origin"] == "sam"]
    assert from_sam and all(r in [s["rle"] for s in sam] for r in from_sam)


def test_model_input_side_from_the_config_alone(tmp_path):
    from pipeline.labeling.labeler import model_input_side

    assert model_input_side("tiny") == 320
    assert model_input_side("random:r50") is None  # the released architecture: shortest edge
    assert model_input_side(str(tmp_path / "release.pth")) is None  # unknown: full size
