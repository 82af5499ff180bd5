"""The assembled release model, end to end, against the official r50 fixture.

The seeded rule's weights are saved as a release checkpoint (`{"model": state_dict}`), loaded
through `hipie.release_build.load_release_checkpoint` (every key mapped and used), and the
fixture's three passes run through `ReleasePredictor` on the fixture's photo at short side 304:
the final instances, the semantic map, the panoptic segmentation, the demo's part masks and the
grounding top-1 must equal the official outputs (up to float ties at the 0.5 mask threshold).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hipie.release_build import load_release_checkpoint, parameter_count
from hipie.release_predictor import ReleasePredictor
from tests.hipie.release.reference import SHARED, fixture, require, write_release_checkpoint

PHOTO = SHARED / "data" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
THINGS, STUFF = ["person", "dog", "ball"], ["grass", "sky", "tree"]
PARTS = ["person head", "person torso", "person arm", "person leg"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path = write_release_checkpoint("r50", tmp_path_factory.mktemp("release") / "rule_r50.pth")
    model = load_release_checkpoint(path)
    path.unlink()
    return ReleasePredictor(model, min_size=304)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.open(require(PHOTO)).convert("RGB"))


@pytest.fixture(scope="module")
def demo(predictor, photo):
    """The demo's three calls on one encoding: things+stuff, the part pass, the part masks."""
    return predictor.parts(photo, THINGS, STUFF, PARTS)


def check_instances(instances, f, pass_name: str, max_pixels: int):
    ref = f"{pass_name}/out/instances"
    assert torch.equal(instances.classes, f[f"{ref}/classes"].long()), "classes / order"
    assert float((instances.scores - f[f"{ref}/scores"]).abs().max()) <= 1e-5
    assert float((instances.boxes - f[f"{ref}/boxes_xyxy"]).abs().max()) <= 1e-2
    masks = torch.from_numpy(f.unpack_masks(f"{ref}/masks_packbits", instances.masks.shape[-1]))
    diff = (instances.masks != masks).flatten(1).sum(1)
    assert int(diff.max()) <= max_pixels, f"{pass_name}: mask pixels differ {diff.tolist()}"


def test_parameters_equal_the_release(predictor):
    assert parameter_count(predictor.model) == 197_690_786  # the release's R50: 197.69 M


def test_things_and_stuff_pass(demo):
    f = fixture("r50")
    det, _, _ = demo
    assert len(det.instances) == f.inputs["passes"]["det"]["n_instances_raw"] == 100
    check_instances(det.instances, f, "det", max_pixels=8)
    assert float((det.sem_seg - f["det/out/sem_seg"]).abs().max()) <= 1e-3
    assert torch.equal(det.sem_seg.argmax(0), f["det/out/sem_seg_argmax"].long())
    assert torch.equal(det.panoptic_seg.long(), f["det/out/panoptic_seg"].long())
    assert det.segments_info == f.inputs["passes"]["det"]["segments_info"]


def test_part_pass_and_part_masks(demo):
    f = fixture("r50")
    _, part, masks = demo
    check_instances(part.instances, f, "part", max_pixels=8)
    assert float((part.sem_seg - f["part/out/sem_seg"]).abs().max()) <= 1e-3
    expected = f.inputs["passes"]["part"]["part_instances_of_det_instances_above_0.5"]
    got = [{"instance": m.instance, "part_class": m.part_class, "label": m.label} for m in masks]
    assert got == [{k: e[k] for k in ("instance", "part_class", "label")} for e in expected]
    ref = torch.from_numpy(f.unpack_masks("part/out/part_instance_masks_packbits", 640))
    for m, r, e in zip(masks, ref, expected):
        assert abs(int(m.mask.sum()) - e["area"]) <= 8 and int((m.mask != r).sum()) <= 8


def test_grounding_top1(predictor, photo):
    f = fixture("r50")
    ref = predictor.refer(photo, f.inputs["passes"]["ref"]["expressions"])
    assert len(ref.instances) == 1 and ref.sem_seg is None
    check_instances(ref.instances, f, "ref", max_pixels=8)


def test_convert_cli_round_trip(tmp_path, predictor, photo):
    """`python -m hipie.convert` writes safetensors that load back to the same outputs."""
    from hipie.convert import main
    from hipie.release_build import is_release_folder, load_release_folder

    path = write_release_checkpoint("r50", tmp_path / "r50_parts.pth")
    assert main(["--official", str(path), "--out", str(tmp_path / "ours")]) == 0
    assert is_release_folder(tmp_path / "ours") and not is_release_folder(tmp_path)
    model = load_release_folder(tmp_path / "ours")
    for (k, a), b in zip(model.state_dict().items(), predictor.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert main(["--official", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2
    from hipie import build_hipie
    from hipie.modeling.hipie_release import HipieRelease

    assert isinstance(build_hipie(checkpoint=str(tmp_path / "ours")), HipieRelease)
