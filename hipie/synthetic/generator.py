"""Seeded generator of synthetic hierarchical scenes, and writers for their ground truth.

A scene is a small image with textured stuff regions (sky, grass, water, sand, wall) and a few
things (robot, car, tree, house, bird), each made of parts and subparts of distinct appearance
(e.g. robot: head with eyes, torso, arms, legs). Things occlude each other. Ground truth:
panoptic segments (things + stuff), part/subpart masks with their parents, and referring
expressions that each pick out exactly one thing ("the large red robot on the left").

Some (thing, part, style) compositions are held out: they never appear in ordinary scenes and
appear on every thing of their class in held-out scenes (`SceneConfig(held_out=True)`), to test
generalisation to novel compositions of seen parts and styles.

Writers: COCO panoptic (PNG + JSON, plus `parts.json` and `referring.json`) and SA-1B style tar
shards (`sa_<n>.jpg` + `sa_<n>.json` with class-agnostic COCO RLE masks).

`python -m hipie.synthetic --out DIR --num-images N --seed S [--sa1b-shards K]
[--width W --height H] [--held-out]` writes a dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from hipie.synthetic.drawing import (
    Canvas,
    ThingPlan,
    plan_thing,
    stuff_layout,
    stuff_texture,
    try_place,
)
from hipie.synthetic.scene import (
    CATEGORIES,
    COLORS,
    HELD_OUT_COMPOSITIONS,
    PART_CLASSES,
    PART_LEVELS,
    STUFF_CLASSES,
    STYLES,
    THING_CLASSES,
    Scene,
    SceneConfig,
    ScenePart,
    SceneSegment,
    category_id,
    mask_bbox,
)
from schemas import rle
from schemas.panoptic import id_to_rgb

__all__ = [
    "CATEGORIES",
    "COLORS",
    "HELD_OUT_COMPOSITIONS",
    "PART_CLASSES",
    "PART_LEVELS",
    "STUFF_CLASSES",
    "STYLES",
    "THING_CLASSES",
    "Scene",
    "SceneConfig",
    "SceneGenerator",
    "ScenePart",
    "SceneSegment",
    "category_id",
    "main",
    "write_coco_panoptic",
    "write_sa1b_shard",
]


# --------------------------------------------------------------------------- expressions
def _expressions(plans: Sequence[ThingPlan], rng: np.random.Generator) -> list[tuple[str, int]]:
    """Referring expressions; each names one thing (ids 1..T in `plans` order) and is unique.

    "left"/"right"/"large"/"small" are relative to the things of the same colour and class.
    """
    out: list[tuple[str, int]] = []
    class_counts = {c: sum(p.cls == c for p in plans) for c in THING_CLASSES}
    for tid, plan in enumerate(plans, start=1):
        group = [(i, p) for i, p in enumerate(plans, start=1) if (p.cls, p.color) == (plan.cls, plan.color)]  # fmt: skip
        noun = f"{plan.color} {plan.cls}"
        if len(group) == 1:
            if class_counts[plan.cls] == 1 and rng.random() < 0.5:
                out.append((f"the {plan.cls}", tid))
            else:
                out.append((f"the {noun}", tid))
            continue
        centers = {i: p.x0 + p.w / 2 for i, p in group}
        sizes = {i: p.w * p.h for i, p in group}
        others = [i for i, _ in group if i != tid]
        size = ""
        if all(sizes[tid] > sizes[i] for i in others):
            size = "large "
        elif all(sizes[tid] < sizes[i] for i in others):
            size = "small "
        if all(centers[tid] < centers[i] for i in others):
            prefix = size if rng.random() < 0.5 else ""
            out.append((f"the {prefix}{noun} on the left", tid))
        elif all(centers[tid] > centers[i] for i in others):
            prefix = size if rng.random() < 0.5 else ""
            out.append((f"the {prefix}{noun} on the right", tid))
        elif size:
            out.append((f"the {size}{noun}", tid))
        elif len(group) == 3:
            out.append((f"the {noun} in the middle", tid))
    texts = [t for t, _ in out]
    assert len(set(texts)) == len(texts), texts  # true by construction
    return out


# --------------------------------------------------------------------------- generator
class SceneGenerator:
    """Deterministic scenes: `scene(i)` depends only on (config, seed, i).

    Args:
        config: scene settings (default `SceneConfig()`).
        seed: generator seed.
    """

    def __init__(self, config: SceneConfig | None = None, seed: int = 0) -> None:
        self.config = config or SceneConfig()
        self.seed = int(seed)

    def scene(self, index: int) -> Scene:
        """Generate scene number `index` (its `image_id` is `index`)."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, int(index), int(cfg.held_out)])
        h, w = cfg.height, cfg.width
        stuff_map, _ = stuff_layout(rng, cfg)
        image = np.zeros((h, w, 3), dtype=np.float32)
        for k in np.unique(stuff_map).tolist():
            sel = stuff_map == k
            image[sel] = stuff_texture(rng, STUFF_CLASSES[k], h, w)[sel]
        canvas = Canvas(
            image=image,
            things=np.zeros((h, w), dtype=np.int64),
            parts=np.zeros((h, w), dtype=np.int64),
            subparts=np.zeros((h, w), dtype=np.int64),
        )
        num = int(rng.integers(cfg.min_things, cfg.max_things + 1))
        plans = sorted((plan_thing(rng, cfg) for _ in range(num)), key=lambda p: p.y0 + p.h)
        for plan in plans:  # far (higher bottom edge) first, so nearer things occlude
            for attempt in range(5):
                if attempt:
                    plan = replace(plan, x0=float(rng.uniform(0, cfg.width - plan.w)))
                if try_place(canvas, plan, cfg):
                    break
        noise = rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(cfg.noise)
        pixels = np.clip(canvas.image + noise, 0, 255).round().astype(np.uint8)
        return self._assemble(index, rng, pixels, stuff_map, canvas)

    def scenes(self, start: int, count: int) -> Iterator[Scene]:
        """Scenes `start .. start + count - 1`, generated lazily."""
        for index in range(start, start + count):
            yield self.scene(index)

    def _assemble(self, index, rng, pixels, stuff_map, canvas: Canvas) -> Scene:
        segments: list[SceneSegment] = []
        for tid, plan in enumerate(canvas.plans, start=1):
            mask = canvas.things == tid
            segments.append(
                SceneSegment(id=tid, category=plan.cls, isthing=True, mask=mask,
                             bbox=mask_bbox(mask), color=plan.color)
            )  # fmt: skip
        next_id = len(segments) + 1
        free = canvas.things == 0
        for k in np.unique(stuff_map[free]).tolist():
            mask = free & (stuff_map == k)
            segments.append(
                SceneSegment(id=next_id, category=STUFF_CLASSES[k], isthing=False, mask=mask,
                             bbox=mask_bbox(mask))
            )  # fmt: skip
            next_id += 1
        parts: list[ScenePart] = []
        final_part_id: dict[int, int] = {}
        for temp, (thing_id, name, style) in enumerate(canvas.part_meta, start=1):
            mask = canvas.parts == temp
            if mask.any():
                final_part_id[temp] = next_id
                parts.append(ScenePart(id=next_id, name=name, parent_id=thing_id, mask=mask,
                                       level="part", style=style))  # fmt: skip
                next_id += 1
        for temp, (part_temp, name) in enumerate(canvas.sub_meta, start=1):
            mask = canvas.subparts == temp
            if mask.any():
                parts.append(ScenePart(id=next_id, name=name, parent_id=final_part_id[part_temp],
                                       mask=mask, level="subpart"))  # fmt: skip
                next_id += 1
        return Scene(
            image=pixels,
            segments=segments,
            parts=parts,
            expressions=_expressions(canvas.plans, rng),
            image_id=int(index),
            held_out=self.config.held_out,
        )


# --------------------------------------------------------------------------- writers
def _jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_coco_panoptic(scenes: Iterable[Scene], out_dir: str | Path) -> tuple[Path, Path, Path]:
    """Write scenes as a COCO-panoptic dataset (streaming: scenes are not kept in memory).

    Layout under `out_dir`: `images/<image_id:06d>.jpg`, `panoptic/<image_id:06d>.png` (ids as
    R + 256 G + 256^2 B), `panoptic.json` (images, annotations with segments_info, categories),
    `parts.json` (COCO instances of parts and subparts: `category_id` into the part categories,
    `segmentation` RLE, `parent_id`, `level`, `style`) and `referring.json`
    ({"refs": [{image_id, segment_id, expression}]}).

    Returns:
        (panoptic json path, PNG folder, image folder).
    """
    out = Path(out_dir)
    images_dir, png_dir = out / "images", out / "panoptic"
    images_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, part_anns, refs = [], [], [], []
    for scene in scenes:
        stem = f"{scene.image_id:06d}"
        images.append({"id": scene.image_id, "file_name": f"{stem}.jpg", "width": scene.width,
                       "height": scene.height, "held_out": scene.held_out})  # fmt: skip
        Image.fromarray(scene.image).save(images_dir / f"{stem}.jpg", quality=95)
        Image.fromarray(id_to_rgb(scene.id_map())).save(png_dir / f"{stem}.png")
        annotations.append(
            {"image_id": scene.image_id, "file_name": f"{stem}.png",
             "segments_info": scene.segments_info()}
        )  # fmt: skip
        for part in scene.parts:
            part_anns.append({
                "id": part.id + scene.image_id * 10_000,
                "image_id": scene.image_id,
                "category_id": PART_CLASSES.index(part.name) + 1,
                "segmentation": rle.encode(part.mask),
                "bbox": part.bbox,
                "area": int(part.mask.sum()),
                "iscrowd": 0,
                "part_id": part.id,
                "parent_id": part.parent_id,
                "level": part.level,
                "style": part.style,
            })  # fmt: skip
        refs.extend(
            {"image_id": scene.image_id, "segment_id": seg_id, "expression": text}
            for text, seg_id in scene.expressions
        )
    part_categories = [
        {"id": i + 1, "name": name, "level": PART_LEVELS[name], "supercategory": name.split()[0]}
        for i, name in enumerate(PART_CLASSES)
    ]
    json_path = out / "panoptic.json"
    json_path.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}
    ))  # fmt: skip
    (out / "parts.json").write_text(json.dumps(
        {"images": images, "annotations": part_anns, "categories": part_categories}
    ))  # fmt: skip
    (out / "referring.json").write_text(json.dumps({"refs": refs}))
    return json_path, png_dir, images_dir


def _sa1b_annotations(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Class-agnostic SA-1B annotations of every thing, stuff, part and subpart mask."""
    masks = [seg.mask for seg in scene.segments] + [part.mask for part in scene.parts]
    anns = []
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        mid = len(ys) // 2  # a pixel of the mask, as SAM's prompt point
        anns.append({
            "id": k + 1,
            "segmentation": rle.encode(mask),
            "bbox": mask_bbox(mask),
            "area": int(len(ys)),
            "predicted_iou": float(rng.uniform(0.85, 1.0)),
            "stability_score": float(rng.uniform(0.9, 1.0)),
            "point_coords": [[float(xs[mid]) + 0.5, float(ys[mid]) + 0.5]],
            "crop_box": [0.0, 0.0, float(scene.width), float(scene.height)],
        })  # fmt: skip
    return anns


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible archives
    tar.addfile(info, io.BytesIO(data))


def write_sa1b_shard(scenes: Iterable[Scene], tar_path: str | Path, *, first_index: int = 0) -> int:
    """Write scenes as one SA-1B style tar shard; returns the number of images written.

    Image number `n = first_index + i + 1` for the i-th scene (SA-1B counts from 1), members
    `sa_<n>.jpg` and `sa_<n>.json`; the JSON holds `image` {image_id, width, height, file_name}
    and `annotations` [{id, segmentation (COCO RLE), bbox (XYWH), area, predicted_iou,
    stability_score, point_coords, crop_box}] with the masks of the scene's segments then parts,
    in that order, and no class names.
    """
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(tar_path, "w") as tar:
        for i, scene in enumerate(scenes):
            n = first_index + i + 1
            rng = np.random.default_rng([n, scene.image_id])
            record = {
                "image": {"image_id": n, "width": scene.width, "height": scene.height,
                          "file_name": f"sa_{n}.jpg"},
                "annotations": _sa1b_annotations(scene, rng),
            }  # fmt: skip
            _add_member(tar, f"sa_{n}.jpg", _jpeg_bytes(scene.image))
            _add_member(tar, f"sa_{n}.json", json.dumps(record).encode())
            count += 1
    return count


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic dataset (COCO panoptic, and SA-1B shards when asked)."""
    parser = argparse.ArgumentParser(prog="python -m hipie.synthetic")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--sa1b-shards", type=int, default=0, help="also write K SA-1B tar shards")
    parser.add_argument("--width", type=int, default=256, help="image width")
    parser.add_argument("--height", type=int, default=256, help="image height")
    parser.add_argument("--held-out", action="store_true", help="held-out compositions only")
    args = parser.parse_args(argv)
    config = SceneConfig(width=args.width, height=args.height, held_out=args.held_out)
    generator = SceneGenerator(config, args.seed)
    out = Path(args.out)
    json_path, _, _ = write_coco_panoptic(generator.scenes(0, args.num_images), out)
    shards = []
    if args.sa1b_shards > 0:
        bounds = np.linspace(0, args.num_images, args.sa1b_shards + 1).round().astype(int)
        for k in range(args.sa1b_shards):
            start, stop = int(bounds[k]), int(bounds[k + 1])
            path = out / "sa1b" / f"sa_{k:06d}.tar"
            write_sa1b_shard(generator.scenes(start, stop - start), path, first_index=start)
            shards.append(str(path))
    print(json.dumps({"panoptic_json": str(json_path), "num_images": args.num_images,
                      "sa1b_shards": shards}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
