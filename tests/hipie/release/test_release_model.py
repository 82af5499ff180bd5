"""The assembled release model, end to end, against fixtures of the official code.

For each fixture (the shipped r50 one, one we generated ourselves with
`../shared/tools/official_hipie/make_reference.py` (seed 11, the other COCO photo, short side 288,
a multi-word thing, parts of two things; `data/own_r50_seed11/inputs.json` holds the command), and
any folders named in `HIPIE_REF_FIXTURES`, ':'-separated): the seeded rule's weights of the
fixture's seed are saved as a release checkpoint (`{"model": state_dict}`), loaded through
`hipie.release_build.load_release_checkpoint` (every key mapped and used), and the fixture's three
passes run through `ReleasePredictor` on its photo at its test size: the final instances, the
semantic map, the panoptic segmentation, the demo's part masks and the grounding top-1 must equal
the official outputs (up to float ties at the 0.5 mask threshold). Compact fixtures store the
first 25 instance masks and the semantic map at every second pixel; those are compared.

Float ties: with random weights, two of the ~3,000 two-stage proposal scores can lie within
float noise (~1e-7) of each other, and their order then decides which learned query content each
proposal gets, so the official code itself changes its outputs with the thread count or the CPU
there. A pass whose official top-k differs from ours only by such a swap is checked up to the
top-k (proposal scores within 1e-4, the same proposals, swapped entries tied) and then run with
the official selection (`ThingTransformer.select_proposals` answers the official indices for that
pass's proposal scores), so its final outputs are compared too; any other difference fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hipie.modeling.image_input import resize_shortest_edge
from hipie.modeling.thing_transformer import ThingTransformer
from hipie.release_build import load_release_checkpoint, parameter_count
from hipie.release_predictor import ReleasePredictor
from tests.hipie.release.reference import SHARED, fixture, require, write_release_checkpoint

PHOTOS = SHARED / "data" / "coco_panoptic_sample" / "input_images"
OWN = Path(__file__).parent / "data" / "own_r50_seed11"
FIXTURE_DIRS = [
    "r50",
    str(OWN),
    *[d for d in os.environ.get("HIPIE_REF_FIXTURES", "").split(":") if d],
]


@pytest.fixture(scope="module", params=FIXTURE_DIRS, ids=lambda d: Path(d).name)
def case(request, tmp_path_factory):
    """(fixture, predictor at its test size, its photo), with the official selection on ties."""
    f = fixture(request.param)
    path = tmp_path_factory.mktemp("release") / "rule.pth"
    write_release_checkpoint(f.inputs["config"], path, seed=int(f.inputs["seed"]))
    model = load_release_checkpoint(path)
    path.unlink()
    predictor = ReleasePredictor(model, min_size=int(f.inputs["cfg"]["INPUT.MIN_SIZE_TEST"]))
    photo = np.asarray(Image.open(require(PHOTOS / Path(f.inputs["image"]).name)).convert("RGB"))
    case = f, predictor, photo
    tied = [p for p in ("det", "part", "ref") if float_tie_swap(case, p)]
    with pytest.MonkeyPatch.context() as patch:
        if tied:
            patch.setattr(ThingTransformer, "select_proposals", official_selection(f, tied))
        yield case


@pytest.fixture(scope="module")
def demo(case):
    """The demo's three calls on one encoding: things+stuff, the part pass, the part masks."""
    f, predictor, photo = case
    det = f.inputs["passes"]["det"]
    n_things = sum(bool(v) for k, v in det["test_is_thing"].items() if k != "0")
    names, parts = det["class_names"], f.inputs["passes"]["part"]["class_names"]
    return predictor.parts(photo, names[:n_things], names[n_things:], parts)


def float_tie_swap(case, pass_name: str) -> bool:
    """Whether our two-stage top-k differs from the official one for a pass; it may differ only
    by a swap of float-tied proposals (see the module docstring), anything else fails."""
    f, predictor, photo = case
    model, info = predictor.model, f.inputs["passes"][pass_name]
    with torch.no_grad():
        enc = model.encode_image([resize_shortest_edge(photo, predictor.min_size, 2048)])
        if pass_name == "ref":
            prompt = model.encode_expression([info["expressions"]])
        else:
            is_thing = {int(k): bool(v) for k, v in info["test_is_thing"].items() if k != "0"}
            prompt = model.encode_classes(info["class_names"], is_thing)
        thing = model.forward_pass(enc, prompt).thing
    ours, theirs = thing.topk_proposals[0], f[f"{pass_name}/thing/topk_proposals"]
    if torch.equal(ours, theirs):
        return False
    scores = f[f"{pass_name}/thing/enc_outputs_class"]
    assert float((thing.enc_class[0] - scores).abs().max()) <= 1e-4 * float(scores.abs().max())
    assert set(ours.tolist()) == set(theirs.tolist()), "different proposals, not a tie"
    swapped = (ours != theirs).nonzero().flatten()
    gap = float((scores[ours[swapped]] - scores[theirs[swapped]]).abs().max())
    assert gap <= 1e-5, f"{pass_name}: top-k order differs by {gap:.2g}, more than a float tie"
    return True


def official_selection(f, passes: list[str]):
    """`ThingTransformer.select_proposals` that answers the official top-k for these passes
    (recognised by their proposal scores) and selects as usual otherwise."""
    forced = [
        (f[f"{p}/thing/enc_outputs_class"], f[f"{p}/thing/topk_proposals"].long()) for p in passes
    ]
    select = ThingTransformer.select_proposals

    def selection(self, enc_class: torch.Tensor) -> torch.Tensor:
        for scores, topk in forced:
            if enc_class.shape[0] == 1 and enc_class.shape[1:] == scores.shape:
                scale = float(scores.abs().max())
                if float((enc_class[0] - scores).abs().max()) <= 1e-4 * scale:
                    return topk[None].to(enc_class.device)
        return select(self, enc_class)

    return selection


def check_instances(instances, f, pass_name: str, max_pixels: int):
    ref = f"{pass_name}/out/instances"
    assert torch.equal(instances.classes, f[f"{ref}/classes"].long()), "classes / order"
    assert float((instances.scores - f[f"{ref}/scores"]).abs().max()) <= 1e-5
    assert float((instances.boxes - f[f"{ref}/boxes_xyxy"]).abs().max()) <= 1e-2
    masks = torch.from_numpy(f.unpack_masks(f"{ref}/masks_packbits", instances.masks.shape[-1]))
    diff = (instances.masks[: len(masks)] != masks).flatten(1).sum(1)  # compact: the first 25
    assert int(diff.max()) <= max_pixels, f"{pass_name}: mask pixels differ {diff.tolist()}"


def check_semantic(sem_seg, f, pass_name: str):
    if f"{pass_name}/out/sem_seg" in f:
        assert float((sem_seg - f[f"{pass_name}/out/sem_seg"]).abs().max()) <= 1e-3
    else:  # compact fixtures
        assert (
            float((sem_seg[:, ::2, ::2] - f[f"{pass_name}/out/sem_seg_sub2"]).abs().max()) <= 1e-3
        )
    # the argmax flips only where two classes tie to float precision
    flips = (sem_seg.argmax(0) != f[f"{pass_name}/out/sem_seg_argmax"].long()).float().mean()
    assert float(flips) <= 1e-3, f"{pass_name}: argmax differs at {float(flips):.2%} of pixels"


def test_parameters_equal_the_release(case):
    assert parameter_count(case[1].model) == 197_690_786  # the release's R50: 197.69 M


def test_things_and_stuff_pass(case, demo):
    f = case[0]
    det, _, _ = demo
    assert len(det.instances) == f.inputs["passes"]["det"]["n_instances_raw"] == 100
    check_instances(det.instances, f, "det", max_pixels=8)
    check_semantic(det.sem_seg, f, "det")
    assert torch.equal(det.panoptic_seg.long(), f["det/out/panoptic_seg"].long())
    assert det.segments_info == f.inputs["passes"]["det"]["segments_info"]


def test_part_pass_and_part_masks(case, demo):
    f = case[0]
    _, part, masks = demo
    check_instances(part.instances, f, "part", max_pixels=8)
    check_semantic(part.sem_seg, f, "part")
    expected = f.inputs["passes"]["part"]["part_instances_of_det_instances_above_0.5"]
    got = [{"instance": m.instance, "part_class": m.part_class, "label": m.label} for m in masks]
    assert got == [{k: e[k] for k in ("instance", "part_class", "label")} for e in expected]
    width = part.sem_seg.shape[-1]
    ref = torch.from_numpy(f.unpack_masks("part/out/part_instance_masks_packbits", width))
    for m, r, e in zip(masks, ref, expected):
        assert abs(int(m.mask.sum()) - e["area"]) <= 8 and int((m.mask != r).sum()) <= 8


def test_grounding_top1(case):
    f, predictor, photo = case
    ref = predictor.refer(photo, f.inputs["passes"]["ref"]["expressions"])
    assert len(ref.instances) == 1 and ref.sem_seg is None
    check_instances(ref.instances, f, "ref", max_pixels=8)


def test_convert_cli_round_trip(tmp_path):
    """`python -m hipie.convert` writes safetensors that load back to the same weights."""
    from hipie import build_hipie
    from hipie.convert import main
    from hipie.modeling.hipie_release import HipieRelease
    from hipie.release_build import is_release_folder, load_release_folder

    path = write_release_checkpoint("r50", tmp_path / "r50_parts.pth")
    assert main(["--official", str(path), "--out", str(tmp_path / "ours")]) == 0
    assert is_release_folder(tmp_path / "ours") and not is_release_folder(tmp_path)
    model = load_release_folder(tmp_path / "ours")
    reference = load_release_checkpoint(path)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    assert main(["--official", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2
    assert isinstance(build_hipie(checkpoint=str(tmp_path / "ours")), HipieRelease)
