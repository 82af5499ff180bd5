"""The label contract: round trip through real Parquet files and every validation error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from schemas import rle

H, W = 24, 32


def _mask(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return rle.encode(m)


def _masks():
    """One mask of each level and origin: a stuff region, an instance, its part and subpart."""
    return [
        schemas.make_mask(
            mask_id=0,
            rle=_mask(0, 8, 0, 32),
            level="stuff",
            label="sky",
            score=0.9,
            origin="hipie",
            topk_labels=["sky", "wall"],
            topk_scores=[0.9, 0.05],
        ),
        schemas.make_mask(
            mask_id=1,
            rle=_mask(8, 24, 4, 20),
            level="instance",
            label="person",
            score=0.8,
            origin="sam",
            sam_iou=0.95,
            sam_stability=0.97,
            topk_labels=["person", "dog"],
            topk_scores=[0.8, 0.1],
        ),
        schemas.make_mask(
            mask_id=2,
            rle=_mask(8, 12, 8, 16),
            level="part",
            label="person head",
            score=0.7,
            origin="sam",
            parent_id=1,
            sam_iou=0.9,
            sam_stability=0.92,
        ),
        schemas.make_mask(
            mask_id=3,
            rle=_mask(9, 10, 9, 11),
            level="subpart",
            label="person eye",
            score=0.6,
            origin="hipie",
            parent_id=2,
        ),
    ]


def _table():
    ok = schemas.make_ok_row(
        image_id="img-1",
        uri="file:///data/img-1.jpg",
        shard="shard-0",
        width=W,
        height=H,
        masks=_masks(),
        model="hipie-tiny",
        vocabulary_hash="abc",
    )
    bad = schemas.make_error_row(
        image_id="img-2",
        uri="file:///data/img-2.jpg",
        shard="shard-0",
        error="cannot decode image: truncated JPEG",
    )
    return schemas.rows_to_table([ok, bad])


def test_make_mask_derives_bbox_and_area():
    m = _masks()[1]
    assert m["bbox"] == [4.0, 8.0, 16.0, 16.0]
    assert m["area"] == 16 * 16


def test_round_trip_through_a_real_parquet_file(tmp_path):
    table = _table()
    schemas.validate_table(table)
    vocabulary = {"things": ["person"], "stuff": ["sky"], "parts": ["head", "eye"]}
    path = tmp_path / "out" / "shard-0.parquet"
    schemas.write_parquet(table, path, vocabulary=vocabulary, extra={"num_inputs": 2})
    assert [p.name for p in path.parent.iterdir()] == ["shard-0.parquet"]  # no temp file left

    back, info = schemas.read_parquet(path)
    assert info["schema_version"] == schemas.SCHEMA_VERSION
    assert info["vocabulary"] == vocabulary
    assert info["extra"] == {"num_inputs": 2}
    assert info["num_rows"] == 2
    assert back.schema.equals(schemas.LABELS_V1, check_metadata=False)
    rows = back.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["error"] == "cannot decode image: truncated JPEG"
    masks = rows[0]["masks"]
    assert [m["level"] for m in masks] == list(schemas.LEVELS)
    assert {m["origin"] for m in masks} == set(schemas.ORIGINS)
    assert [m["parent_id"] for m in masks] == [None, None, 1, 2]
    assert masks[1]["sam_iou"] == pytest.approx(0.95)
    assert masks[1]["topk_labels"] == ["person", "dog"]
    for written, original in zip(masks, _masks()):
        np.testing.assert_array_equal(rle.decode(written["rle"]), rle.decode(original["rle"]))
    schemas.validate_table(back)
    assert schemas.count_levels(back) == {"stuff": 1, "instance": 1, "part": 1, "subpart": 1}


def _with_mask_field(field, value, index=1):
    rows = _table().to_pylist()
    rows[0]["masks"][index][field] = value
    return pa.Table.from_pylist(rows, schema=schemas.LABELS_V1)


def test_missing_column_is_named():
    with pytest.raises(schemas.SchemaError, match="missing column 'height'"):
        schemas.validate_table(_table().drop_columns(["height"]))


def test_wrong_type_is_named():
    table = _table()
    i = table.schema.get_field_index("width")
    bad = table.set_column(i, "width", pa.array(["32", None]))
    with pytest.raises(schemas.SchemaError, match="column 'width' has type string"):
        schemas.validate_table(bad)


def test_rle_size_disagreeing_with_image_is_named():
    wrong = rle.encode(np.ones((H + 1, W), bool))
    with pytest.raises(
        schemas.SchemaError, match=r"row 0 \(image_id 'img-1'\): masks\[1\]\.rle size"
    ):
        schemas.validate_table(_with_mask_field("rle", wrong))


def test_rle_counts_not_covering_the_image_are_named():
    short = {"size": [H, W], "counts": rle.encode(np.ones((H, W - 1), bool))["counts"]}
    with pytest.raises(schemas.SchemaError, match=r"masks\[1\]\.rle: RLE counts cover"):
        schemas.validate_table(_with_mask_field("rle", short))


def test_parent_id_that_does_not_exist_is_named():
    with pytest.raises(schemas.SchemaError, match=r"masks\[2\]\.parent_id = 7"):
        schemas.validate_table(_with_mask_field("parent_id", 7, index=2))


@pytest.mark.parametrize("score", [1.5, -0.1])
def test_score_outside_unit_interval_is_named(score):
    with pytest.raises(schemas.SchemaError, match=rf"masks\[1\]\.score = {score} is outside"):
        schemas.validate_table(_with_mask_field("score", score))


def test_other_bad_values_are_named():
    with pytest.raises(schemas.SchemaError, match=r"masks\[1\]\.level = 'object'"):
        schemas.validate_table(_with_mask_field("level", "object"))
    with pytest.raises(schemas.SchemaError, match=r"masks\[1\]\.origin = 'clip'"):
        schemas.validate_table(_with_mask_field("origin", "clip"))
    with pytest.raises(schemas.SchemaError, match="topk_scores has 1 values for 2 topk_labels"):
        schemas.validate_table(_with_mask_field("topk_scores", [0.5]))
    rows = _table().to_pylist()
    rows[1]["error"] = ""
    with pytest.raises(schemas.SchemaError, match=r"row 1 \(image_id 'img-2'\): error rows need"):
        schemas.validate_table(pa.Table.from_pylist(rows, schema=schemas.LABELS_V1))


def test_error_row_needs_a_reason():
    with pytest.raises(ValueError, match="non-empty reason"):
        schemas.make_error_row(image_id="x", uri="u", shard="s", error="")


def test_reading_another_schema_version_is_refused(tmp_path):
    table = _table().replace_schema_metadata({})
    path = tmp_path / "old.parquet"
    pq.write_table(table, path)
    with pytest.raises(schemas.SchemaError, match="schema version None"):
        schemas.read_parquet(path)
