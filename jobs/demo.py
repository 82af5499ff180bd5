"""`make demo`: run the main job end to end on the embedded defaults.

Today this writes the COCO sample's ground truth through the label contract (real Parquet, validated)
so the install and the output format can be seen working; the labeling job (`jobs.label`) replaces it
as soon as it lands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import schemas
from schemas import rle

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLE = (REPO / ".." / "shared" / "data" / "coco_panoptic_sample").resolve()


def coco_sample_rows(sample: Path) -> tuple[list[dict], dict]:
    """Rows of schema v1 holding the sample's panoptic ground truth (stuff and instances)."""
    data = json.loads((sample / "panoptic_examples.json").read_text())
    categories = {
        c["id"]: c for c in json.loads((sample / "panoptic_coco_categories.json").read_text())
    }
    images = {im["id"]: im for im in data["images"]}
    rows = []
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        png = np.asarray(Image.open(sample / "panoptic_examples" / ann["file_name"]), np.uint32)
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        masks = []
        for k, seg in enumerate(ann["segments_info"]):
            cat = categories[seg["category_id"]]
            masks.append(
                schemas.make_mask(
                    mask_id=k,
                    rle=rle.encode(ids == seg["id"]),
                    level="instance" if cat["isthing"] else "stuff",
                    label=cat["name"],
                    score=1.0,
                    origin="hipie",
                )
            )
        rows.append(
            schemas.make_ok_row(
                image_id=str(image["id"]),
                uri=str(sample / "input_images" / image["file_name"]),
                shard="coco-sample",
                width=image["width"],
                height=image["height"],
                masks=masks,
                model="ground-truth",
                vocabulary_hash="coco-panoptic",
            )
        )
    vocabulary = {
        "things": [c["name"] for c in categories.values() if c["isthing"]],
        "stuff": [c["name"] for c in categories.values() if not c["isthing"]],
    }
    return rows, vocabulary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo_output", help="where the demo writes its files")
    args = parser.parse_args(argv)
    out = Path(args.workdir)
    rows, vocabulary = coco_sample_rows(COCO_SAMPLE)
    table = schemas.rows_to_table(rows)
    schemas.validate_table(table)
    path = out / "labels" / "coco-sample.parquet"
    schemas.write_parquet(table, path, vocabulary=vocabulary, extra={"num_inputs": len(rows)})
    back, _ = schemas.read_parquet(path)
    print(f"wrote {back.num_rows} rows to {path}: masks per level {schemas.count_levels(back)}")
    print("still to come: labeling with HIPIE on a local Ray cluster (jobs.label).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
