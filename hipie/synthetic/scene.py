"""The world of the synthetic scenes: classes, part templates, held-out compositions, and the
typed containers of a generated scene (`Scene`, `SceneSegment`, `ScenePart`, `SceneConfig`).

Generation lives in `hipie.synthetic.generator` (which re-exports everything public here) and
drawing in `hipie.synthetic.drawing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CATEGORIES",
    "COLORS",
    "HELD_OUT_COMPOSITIONS",
    "PART_CLASSES",
    "PART_LEVELS",
    "PART_OF_SUBPART",
    "ROLE_COLORS",
    "STUFF_CLASSES",
    "STYLES",
    "TEMPLATES",
    "THING_CLASSES",
    "Scene",
    "SceneConfig",
    "ScenePart",
    "SceneSegment",
    "category_id",
    "mask_bbox",
]

THING_CLASSES: tuple[str, ...] = ("robot", "car", "tree", "house", "bird")
STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "sand", "wall")
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "checker")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "blue": (40, 75, 205),
    "green": (45, 165, 65),
    "yellow": (235, 205, 40),
    "white": (235, 235, 235),
    "purple": (135, 55, 165),
    "orange": (240, 135, 30),
    "black": (45, 45, 45),
}
# Fixed colours of part roles that do not take the thing's colour.
ROLE_COLORS: dict[str, tuple[int, int, int]] = {
    "eye": (250, 250, 250),
    "glass": (150, 205, 240),
    "tire": (30, 30, 30),
    "metal": (175, 175, 190),
    "bark": (110, 70, 40),
    "wood": (125, 80, 45),
    "fruit": (225, 30, 60),
    "beak": (250, 170, 30),
    "brick": (160, 60, 45),
}

# Shapes in unit coordinates of the thing's box (u right, v down, both in [0, 1]):
# ("rect", u0, v0, u1, v1), ("ellipse", cu, cv, ru, rv), ("poly", ((u, v), ...)) (convex).
# A part: (name, primitives, colour role, styled, subparts); a subpart: (name, primitives, role).
# "main" = the thing's colour, "dark" / "light" = shades of it. Later parts are drawn on top.
TEMPLATES: dict[str, dict] = {
    "robot": {
        "aspect": 1.5,  # height / width
        "flip": False,
        "parts": (
            ("leg", (("rect", 0.28, 0.66, 0.45, 1.0),), "dark", False, ()),
            ("leg", (("rect", 0.55, 0.66, 0.72, 1.0),), "dark", False, ()),
            ("arm", (("rect", 0.03, 0.30, 0.19, 0.62),), "dark", False, ()),
            ("arm", (("rect", 0.81, 0.30, 0.97, 0.62),), "dark", False, ()),
            ("torso", (("rect", 0.20, 0.28, 0.80, 0.68),), "main", True, ()),
            (
                "head",
                (("rect", 0.30, 0.02, 0.70, 0.27),),
                "light",
                False,
                (
                    ("eye", (("ellipse", 0.42, 0.13, 0.06, 0.045),), "eye"),
                    ("eye", (("ellipse", 0.58, 0.13, 0.06, 0.045),), "eye"),
                ),
            ),
        ),
    },
    "car": {
        "aspect": 0.55,
        "flip": True,
        "parts": (
            (
                "body",
                (("rect", 0.0, 0.38, 1.0, 0.82), ("rect", 0.18, 0.05, 0.78, 0.42)),
                "main",
                True,
                (),
            ),
            ("window", (("rect", 0.24, 0.12, 0.47, 0.38),), "glass", False, ()),
            ("window", (("rect", 0.52, 0.12, 0.72, 0.38),), "glass", False, ()),
            (
                "wheel",
                (("ellipse", 0.22, 0.80, 0.12, 0.20),),
                "tire",
                False,
                (("hubcap", (("ellipse", 0.22, 0.80, 0.055, 0.09),), "metal"),),
            ),
            (
                "wheel",
                (("ellipse", 0.78, 0.80, 0.12, 0.20),),
                "tire",
                False,
                (("hubcap", (("ellipse", 0.78, 0.80, 0.055, 0.09),), "metal"),),
            ),
        ),
    },
    "tree": {
        "aspect": 1.4,
        "flip": False,
        "parts": (
            ("trunk", (("rect", 0.41, 0.50, 0.59, 1.0),), "bark", False, ()),
            (
                "crown",
                (("ellipse", 0.50, 0.33, 0.48, 0.32),),
                "main",
                True,
                (
                    ("fruit", (("ellipse", 0.33, 0.25, 0.07, 0.05),), "fruit"),
                    ("fruit", (("ellipse", 0.64, 0.36, 0.07, 0.05),), "fruit"),
                    ("fruit", (("ellipse", 0.45, 0.48, 0.07, 0.05),), "fruit"),
                ),
            ),
        ),
    },
    "house": {
        "aspect": 0.95,
        "flip": True,
        "parts": (
            ("facade", (("rect", 0.08, 0.40, 0.92, 1.0),), "main", False, ()),
            ("roof", (("poly", ((0.0, 0.42), (0.5, 0.0), (1.0, 0.42))),), "brick", True, ()),
            (
                "door",
                (("rect", 0.42, 0.62, 0.62, 1.0),),
                "wood",
                False,
                (("knob", (("ellipse", 0.57, 0.82, 0.035, 0.035),), "metal"),),
            ),
            ("window", (("rect", 0.15, 0.52, 0.33, 0.72),), "glass", False, ()),
            ("window", (("rect", 0.70, 0.52, 0.88, 0.72),), "glass", False, ()),
        ),
    },
    "bird": {
        "aspect": 0.75,
        "flip": True,
        "parts": (
            ("tail", (("poly", ((0.24, 0.50), (0.0, 0.28), (0.0, 0.74))),), "dark", False, ()),
            ("body", (("ellipse", 0.45, 0.56, 0.30, 0.26),), "main", False, ()),
            ("wing", (("ellipse", 0.42, 0.48, 0.21, 0.14),), "dark", True, ()),
            (
                "head",
                (("ellipse", 0.76, 0.32, 0.14, 0.18),),
                "light",
                False,
                (
                    ("eye", (("ellipse", 0.80, 0.27, 0.035, 0.045),), "eye"),
                    ("beak", (("poly", ((0.87, 0.27), (1.0, 0.35), (0.87, 0.42))),), "beak"),
                ),
            ),
        ),
    },
}


def _part_names() -> tuple[tuple[str, str], ...]:
    names: list[tuple[str, str]] = []
    for thing in THING_CLASSES:
        for name, _, _, _, subparts in TEMPLATES[thing]["parts"]:
            for full, level in ((f"{thing} {name}", "part"),) + tuple(
                (f"{thing} {sub[0]}", "subpart") for sub in subparts
            ):
                if (full, level) not in names:
                    names.append((full, level))
    return tuple(names)


# "object-part" class names (Sec. 3.7 concatenates instance and part names), parts then subparts
# in template order, e.g. "robot head", "robot eye".
PART_CLASSES: tuple[str, ...] = tuple(name for name, _ in _part_names())
PART_LEVELS: dict[str, str] = dict(_part_names())  # "robot eye" -> "subpart"
# subpart class -> the part class holding it ("robot eye" -> "robot head"): the grouping of
# mIoU_PartS ("grouped part classes", Sec. 4), which scores subparts as their parts
PART_OF_SUBPART: dict[str, str] = {
    f"{thing} {sub[0]}": f"{thing} {name}"
    for thing in THING_CLASSES
    for name, _, _, _, subparts in TEMPLATES[thing]["parts"]
    for sub in subparts
}

# (thing, part, style) never drawn in ordinary scenes; every styled part of its class takes it
# in held-out scenes. Each style still appears on other classes, so only the composition is new.
HELD_OUT_COMPOSITIONS: tuple[tuple[str, str, str], ...] = (
    ("robot", "torso", "striped"),
    ("car", "body", "dotted"),
    ("tree", "crown", "checker"),
    ("house", "roof", "striped"),
    ("bird", "wing", "checker"),
)

# COCO-panoptic categories: things 1..5, stuff 6..10.
CATEGORIES: tuple[dict, ...] = tuple(
    {"id": i + 1, "name": name, "isthing": 1, "supercategory": "thing", "color": list(color)}
    for i, (name, color) in enumerate(
        zip(THING_CLASSES, ((200, 0, 0), (0, 0, 200), (0, 150, 0), (150, 100, 50), (220, 220, 0)))
    )
) + tuple(
    {"id": len(THING_CLASSES) + i + 1, "name": name, "isthing": 0, "supercategory": "stuff",
     "color": list(color)}
    for i, (name, color) in enumerate(
        zip(STUFF_CLASSES, ((120, 170, 240), (60, 140, 50), (30, 80, 160), (210, 190, 130),
                            (150, 80, 60)))
    )
)  # fmt: skip
_CATEGORY_IDS = {c["name"]: c["id"] for c in CATEGORIES}


def category_id(name: str) -> int:
    """COCO category id of a thing or stuff class name."""
    return _CATEGORY_IDS[name]


def mask_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] in pixels of an (H, W) bool mask (COCO convention); zeros when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]  # fmt: skip


@dataclass(frozen=True)
class SceneConfig:
    """Scene generator settings."""

    width: int = 256  # image width in pixels
    height: int = 256  # image height in pixels
    min_things: int = 1  # fewest things attempted per scene
    max_things: int = 5  # most things attempted per scene (some may be dropped by occlusion)
    min_scale: float = 0.22  # smallest thing height as a fraction of the image height
    max_scale: float = 0.55  # largest thing height as a fraction of the image height
    min_visible: float = 0.4  # fraction of a thing that must stay visible under occluders
    min_pixels: int = 48  # fewest visible pixels of a thing
    noise: float = 6.0  # std of the Gaussian pixel noise (0..255 scale)
    wall_probability: float = 0.35  # chance of a wall region
    held_out: bool = False  # draw held-out compositions (and only held-out scenes)


@dataclass(frozen=True)
class SceneSegment:
    """A panoptic segment: a thing instance or a stuff region.

    mask: (H, W) bool, visible pixels only (segments never overlap).
    bbox: [x, y, w, h] of the mask in pixels (COCO convention).
    color: the thing's colour name (None for stuff).
    """

    id: int
    category: str
    isthing: bool
    mask: np.ndarray
    bbox: list[float]
    color: str | None = None

    @property
    def category_id(self) -> int:
        return category_id(self.category)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class ScenePart:
    """A part (parent = a thing segment id) or a subpart (parent = a part id).

    name: "object-part" class name from PART_CLASSES, e.g. "robot head".
    mask: (H, W) bool, visible pixels; a part contains its subparts, a subpart lies in its part.
    level: "part" or "subpart".
    style: texture style of the part ("solid" unless the part is styled).
    """

    id: int
    name: str
    parent_id: int
    mask: np.ndarray
    level: str
    style: str = "solid"

    @property
    def bbox(self) -> list[float]:
        return mask_bbox(self.mask)


@dataclass(frozen=True)
class Scene:
    """One synthetic image with its ground truth.

    image: (H, W, 3) uint8 RGB.
    segments: things then stuff; every pixel belongs to exactly one segment.
    parts: parts then subparts (ids distinct from segment ids).
    expressions: (text, thing segment id), each text unique in the scene and true of one thing.
    """

    image: np.ndarray
    segments: list[SceneSegment]
    parts: list[ScenePart]
    expressions: list[tuple[str, int]]
    image_id: int = 0
    held_out: bool = False

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def id_map(self) -> np.ndarray:
        """(H, W) int64 panoptic segment ids (0 where no segment, which does not happen)."""
        out = np.zeros(self.image.shape[:2], dtype=np.int64)
        for seg in self.segments:
            out[seg.mask] = seg.id
        return out

    def semantic_map(self) -> np.ndarray:
        """(H, W) int64 category ids (CATEGORIES), 0 where no segment."""
        out = np.zeros(self.image.shape[:2], dtype=np.int64)
        for seg in self.segments:
            out[seg.mask] = seg.category_id
        return out

    def part_map(self, ignore_index: int = 255) -> np.ndarray:
        """(H, W) int64 indices into PART_CLASSES (subparts over parts), `ignore_index` elsewhere."""
        out = np.full(self.image.shape[:2], ignore_index, dtype=np.int64)
        for level in ("part", "subpart"):
            for part in self.parts:
                if part.level == level:
                    out[part.mask] = PART_CLASSES.index(part.name)
        return out

    def segments_info(self) -> list[dict]:
        """COCO-panoptic `segments_info` of the scene."""
        return [
            {
                "id": seg.id,
                "category_id": seg.category_id,
                "iscrowd": 0,
                "bbox": seg.bbox,
                "area": seg.area,
            }
            for seg in self.segments
        ]
