"""`make demo`: the main job end to end on the embedded defaults.

Generates a small collection (synthetic SA-1B-format tar shards with class-agnostic masks, and a
folder with the COCO sample's photos), labels it with the shipped tiny HIPIE model on a local Ray
cluster, writes Parquet and prints the summary and where the files are.

``coco_sample_rows`` (the COCO sample's ground truth as schema-v1 rows) also serves the tests.
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


def make_collection(root: Path, *, num_scenes: int = 8, seed: int = 7) -> list[str]:
    """A small collection: synthetic SA-1B-format shards (with class-agnostic masks) and a folder
    holding the COCO sample's two photos. Returns the ``--input`` URIs."""
    from hipie.synthetic.generator import SceneGenerator, write_sa1b_shard

    generator = SceneGenerator(seed=seed)
    shards = root / "sa1b"
    shards.mkdir(parents=True, exist_ok=True)
    half = num_scenes // 2
    for k, (start, count) in enumerate([(0, half), (half, num_scenes - half)]):
        scenes = generator.scenes(start, count)
        write_sa1b_shard(scenes, shards / f"sa_{k:06d}.tar", first_index=start)
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for src in sorted((COCO_SAMPLE / "input_images").glob("*.jpg")):
        (photos / src.name).write_bytes(src.read_bytes())
    return [str(shards), str(photos)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the labeling job end to end on generated data with the shipped tiny model."
    )
    parser.add_argument("--workdir", default="demo_output", help="where the demo writes its files")
    parser.add_argument("--checkpoint", default="tiny", help="HIPIE checkpoint (default: tiny)")
    parser.add_argument("--num-scenes", type=int, default=8, help="synthetic SA-1B images")
    args = parser.parse_args(argv)
    from jobs import label

    work = Path(args.workdir).resolve()
    inputs = make_collection(work / "collection", num_scenes=args.num_scenes)
    output = work / "labels"
    argv_label = [a for i in inputs for a in ("--input", i)]
    argv_label += [
        "--output",
        str(output),
        "--checkpoint",
        args.checkpoint,
        "--vocabulary",
        str(REPO / "pipeline" / "vocabularies" / "synthetic.yaml"),
        "--num-cpus",
        "2",
        "--batch-size",
        "2",
        "--overwrite",
    ]
    print("python -m jobs.label " + " ".join(argv_label))
    code = label.main(argv_label)
    files = sorted(output.glob("*.parquet"))
    print(f"\n{len(files)} Parquet files in {output}:")
    for f in files:
        table, _ = schemas.read_parquet(f)
        status = table.column("status").to_pylist()
        print(
            f"  {f.name}: {status.count('ok')} ok, {status.count('error')} error, "
            f"masks per level {schemas.count_levels(table)}"
        )
    print(f"review them: python -m jobs.review --labels {output} --dataset demo --launch")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
