"""The labeler in-process (no Ray) with a released checkpoint (`--checkpoint r50_parts.pth`).

The seeded rule's weights stand in for `r50_parts.pth` (same format, every key; meaningless but
deterministic outputs). The two COCO sample photos (halved, to keep the release's full-size
post-processing cheap on CPU) go through `Labeler.__call__`: one with SA-1B-style masks (the
vote), one without (HIPIE's own hierarchy); both rows must be `ok` and validate.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

import schemas
from hipie import build_hipie
from hipie.modeling.hipie_release import HipieRelease
from hipie.release_hierarchy import ReleaseHierarchyPredictor
from pipeline.labeling.config import COUNT, END, LabelJobConfig
from pipeline.labeling.labeler import Labeler
from pipeline.masks.sam_json import decode_sam_json
from pipeline.vocabulary import Vocabulary
from schemas import rle
from tests.hipie.release.reference import write_release_checkpoint

THINGS = ("person", "dog", "ball", "car", "horse", "bird", "cat", "chair", "bicycle", "kite")
STUFF = ("grass", "sky", "tree", "road", "wall", "sea")


@pytest.fixture(scope="module")
def labeler(tmp_path_factory):
    path = write_release_checkpoint("r50", tmp_path_factory.mktemp("release") / "r50_rule.pth")
    vocab = Vocabulary.from_lists(
        things=THINGS,
        stuff=STUFF,
        parts=("head", "ear", "leg", "wheel"),
        thing_parts={"person": ("head", "ear", "leg"), "dog": ("head", "leg"), "car": ("wheel",)},
        part_groups={"head": ("ear",)},
    )
    config = LabelJobConfig(
        inputs=(), output="unused", vocabulary_json=vocab.to_json(), checkpoint=str(path),
        test_size=256,
    )  # fmt: skip
    labeler = Labeler(config)
    path.unlink()
    return labeler


def _sa1b_masks(height: int, width: int) -> str:
    """An SA-1B-style json for the image, decoded as the job decodes it."""
    annotations = []
    for y0, x0, y1, x1 in [(0, 0, height, width), (20, 30, 150, 200), (60, 80, 120, 140)]:
        m = np.zeros((height, width), bool)
        m[y0:y1, x0:x1] = True
        annotations.append(
            {"segmentation": rle.encode(m), "predicted_iou": 0.9, "stability_score": 0.95}
        )
    masks = decode_sam_json({"annotations": annotations}, width, height)
    return json.dumps([asdict(m) for m in masks])


def test_release_checkpoint_labels_photos_with_and_without_sa1b_masks(labeler, coco_sample):
    assert isinstance(labeler.predictor, ReleaseHierarchyPredictor)
    assert labeler.predictor.config.min_size == 256
    files = sorted((coco_sample / "input_images").glob("*.jpg"))
    assert len(files) == 2
    images = []
    for f in files:
        im = Image.open(f).convert("RGB")
        images.append(np.asarray(im.resize((im.width // 2, im.height // 2), Image.BILINEAR)))
    sam = _sa1b_masks(*images[0].shape[:2])
    image_column = np.empty(2, dtype=object)
    image_column[0], image_column[1] = images
    batch = {
        "shard": np.array(["photos"] * 2, dtype=object),
        "image_id": np.array([f.stem for f in files], dtype=object),
        "uri": np.array([str(f) for f in files], dtype=object),
        "error": np.array(["", ""], dtype=object),
        "image": image_column,
        "sam_masks": np.array([sam, ""], dtype=object),
        END: np.array([False, False]),
        COUNT: np.array([0, 0]),
    }
    table = labeler(batch)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    schemas.validate_table(table.drop_columns([END, COUNT]).cast(schemas.LABELS_V1))
    voted, own = rows[0]["masks"], rows[1]["masks"]
    assert rows[0]["model"].startswith("hipie:") and rows[0]["model"].endswith("r50_rule.pth")

    # with SA-1B masks: every SAM mask labeled (HIPIE's person / bird masks replace SAM's)
    sam_rles = [m["rle"] for m in json.loads(sam)]
    from_sam = [m for m in voted if m["origin"] == "sam"]
    assert [m["rle"] for m in from_sam] == [
        r for r in sam_rles if any(m["rle"] == r for m in from_sam)
    ]
    assert all(m["sam_iou"] == pytest.approx(0.9) for m in from_sam)
    assert all(m["origin"] == "hipie" for m in voted if m not in from_sam)
    assert len(from_sam) + sum(m["origin"] == "hipie" for m in voted) == len(voted) > 0

    # without: HIPIE's hierarchy, parts under instances of their thing
    assert own and {m["origin"] for m in own} == {"hipie"}
    assert "instance" in {m["level"] for m in own}
    by_id = {m["mask_id"]: m for m in own}
    for m in own:
        if m["level"] == "part" and m["parent_id"] is not None:
            parent = by_id[m["parent_id"]]
            assert parent["level"] == "instance" and m["label"].startswith(parent["label"] + " ")
        if m["level"] == "subpart":
            assert by_id[m["parent_id"]]["level"] == "part"


def test_random_release_presets_and_hub_names_offline():
    model = build_hipie(checkpoint="random:r50")  # the released architecture, nothing downloaded
    assert isinstance(model, HipieRelease) and model.settings.name == "r50"
    with pytest.raises(FileNotFoundError, match="Offline|offline"):
        build_hipie(checkpoint="berkeley-hipie/HIPIE/r50_parts.pth")
    with pytest.raises(FileNotFoundError, match="no release checkpoint"):
        build_hipie(checkpoint="missing_r50_parts.pth")


def test_test_size_option_reaches_the_job_config():
    from jobs.label import build_parser

    args = build_parser().parse_args(
        [
            "--input",
            "photos",
            "--output",
            "out",
            "--checkpoint",
            "r50_parts.pth",
            "--test-size",
            "512",
        ]
    )
    assert (args.checkpoint, args.test_size) == ("r50_parts.pth", 512)


def test_tiny_release_folder_with_the_clip_ensemble(tmp_path, coco_sample):
    """`--checkpoint <release folder> --clip MODEL`: the release's mask-token CLIP runs in the
    detection passes (a random open_clip ViT registered under a test name)."""
    import torch

    pytest.importorskip("open_clip")
    from hipie.clip_release import MaskClip
    from hipie.release_build import release_model, save_release_folder
    from tests.hipie.release.test_clip_release import register_tiny_clip

    clip_name = register_tiny_clip(tmp_path)
    torch.manual_seed(0)
    folder = save_release_folder(release_model("tiny"), tmp_path / "tiny_release")
    vocab = Vocabulary.from_lists(things=("person", "horse"), stuff=("grass", "sky"))
    config = LabelJobConfig(
        inputs=(), output="unused", vocabulary_json=vocab.to_json(), checkpoint=str(folder),
        clip=clip_name,
    )  # fmt: skip
    labeler = Labeler(config)
    clip = labeler.predictor.release.clip
    assert isinstance(clip, MaskClip) and clip._text_cache == {}
    photo = np.asarray(Image.open(sorted((coco_sample / "input_images").glob("*.jpg"))[0]))
    batch = {
        "shard": np.array(["photos"], dtype=object),
        "image_id": np.array(["p"], dtype=object),
        "uri": np.array(["p.jpg"], dtype=object),
        "error": np.array([""], dtype=object),
        "image": np.array([photo[::2, ::2].copy(), None], dtype=object)[:1],
        "sam_masks": np.array([""], dtype=object),
        END: np.array([False]),
        COUNT: np.array([0]),
    }
    rows = labeler(batch).to_pylist()
    assert rows[0]["status"] == "ok", rows[0]["error"]
    # CLIP scored the things + stuff pass's classes (its text features are cached per prompt)
    assert (("person", "horse", "grass", "sky"),) == tuple(clip._text_cache)
