"""Drawing of the synthetic scenes: stuff layout and textures, thing placement with occlusion,
rasterisation of the part templates and their texture styles.

All randomness comes from the `np.random.Generator` passed in, so a scene is a pure function of
its seed. Used by `hipie.synthetic.generator.SceneGenerator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from hipie.synthetic.scene import (
    COLORS,
    HELD_OUT_COMPOSITIONS,
    ROLE_COLORS,
    STUFF_CLASSES,
    STYLES,
    TEMPLATES,
    THING_CLASSES,
    SceneConfig,
)

__all__ = ["Canvas", "ThingPlan", "plan_thing", "stuff_layout", "stuff_texture", "try_place"]

_Prim = tuple  # ("rect", ...), ("ellipse", ...) or ("poly", ...), see TEMPLATES


# --------------------------------------------------------------------------- rasterisation
def _primitive(prim: _Prim, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a primitive on unit coordinate grids `u`, `v` of shape (h, w)."""
    kind = prim[0]
    if kind == "rect":
        _, u0, v0, u1, v1 = prim
        return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)
    if kind == "ellipse":
        _, cu, cv, ru, rv = prim
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0
    if kind == "poly":
        pts = prim[1]
        inside_pos = np.ones(u.shape, dtype=bool)
        inside_neg = np.ones(u.shape, dtype=bool)
        for (au, av), (bu, bv) in zip(pts, pts[1:] + pts[:1]):
            cross = (bu - au) * (v - av) - (bv - av) * (u - au)
            inside_pos &= cross >= 0
            inside_neg &= cross <= 0
        return inside_pos | inside_neg
    raise ValueError(f"unknown primitive {kind!r}")


def _union(prims: Iterable[_Prim], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(u.shape, dtype=bool)
    for prim in prims:
        out |= _primitive(prim, u, v)
    return out


def _shade(color: tuple[int, int, int], factor: float) -> np.ndarray:
    """factor < 1 darkens towards black, > 1 lightens towards white."""
    c = np.asarray(color, dtype=np.float32)
    if factor <= 1:
        return c * factor
    return c + (255 - c) * min(factor - 1, 1.0)


def _style_pattern(style: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """(h, w) float32 brightness multipliers of a texture style in pixel-ish units."""
    if style == "solid":
        return np.ones(u.shape, dtype=np.float32)
    if style == "striped":
        return np.where(((u + v) / period) % 2 < 1, 1.0, 0.55).astype(np.float32)
    if style == "dotted":
        du = (u / period) % 2 - 1
        dv = (v / period) % 2 - 1
        return np.where(du**2 + dv**2 < 0.35, 1.6, 1.0).astype(np.float32)
    if style == "checker":
        return np.where(((u // period) + (v // period)) % 2 == 0, 1.0, 0.5).astype(np.float32)
    raise ValueError(f"unknown style {style!r}")


# --------------------------------------------------------------------------- stuff
def stuff_layout(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, list[str]]:
    """(H, W) int64 map of indices into STUFF_CLASSES, and the classes used."""
    h, w = cfg.height, cfg.width
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    horizon = h * rng.uniform(0.3, 0.55) + h * 0.03 * np.sin(
        2 * np.pi * xs / (w * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * np.pi)
    )
    ground = rng.choice(["grass", "water", "sand"], size=2, replace=False).tolist()
    out = np.full((h, w), STUFF_CLASSES.index("sky"), dtype=np.int64)
    out[ys >= horizon[None, :]] = STUFF_CLASSES.index(ground[0])
    if rng.random() < 0.5:
        second = horizon + (h - horizon) * rng.uniform(0.35, 0.7)
        out[ys >= second[None, :]] = STUFF_CLASSES.index(ground[1])
    if rng.random() < cfg.wall_probability:
        width = int(w * rng.uniform(0.2, 0.4))
        top = int(h * rng.uniform(0.0, 0.2))
        bottom = int(horizon.min() + h * rng.uniform(0.0, 0.1))
        cols = slice(0, width) if rng.random() < 0.5 else slice(w - width, w)
        out[top:bottom, cols] = STUFF_CLASSES.index("wall")
    used = [STUFF_CLASSES[i] for i in np.unique(out)]
    return out, used


def stuff_texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 texture of a stuff class over the whole image."""
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    xs = np.arange(w, dtype=np.float32)[None, :, None]
    unit = max(h, w) / 256.0  # texture periods scale with the image
    if name == "sky":
        top, low = np.array([95, 150, 225], np.float32), np.array([195, 220, 248], np.float32)
        t = ys / max(h - 1, 1)
        return np.broadcast_to(top * (1 - t) + low * t, (h, w, 3)).copy()
    if name == "grass":
        base = np.array([70, 150, 55], np.float32)
        blades = rng.standard_normal(size=(1, w, 1), dtype=np.float32) * 18
        return base + blades + 14 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)
    if name == "water":
        base = np.array([40, 95, 175], np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * ys / (7 * unit) + np.sin(xs / (11 * unit)) + phase)
        return base + 22 * waves * np.array([0.6, 0.8, 1.0], np.float32)
    if name == "sand":
        base = np.array([215, 192, 135], np.float32)
        speckle = (rng.random((h, w, 1), dtype=np.float32) < 0.08).astype(np.float32) * -45
        return base + speckle + 6 * rng.standard_normal(size=(h, w, 1), dtype=np.float32)
    if name == "wall":
        brick, mortar = np.array([165, 85, 60], np.float32), np.array([205, 200, 190], np.float32)
        bh, bw = 8 * unit, 18 * unit
        row = ys // bh
        offset = (row % 2) * bw / 2
        is_mortar = ((ys % bh) < max(1, unit)) | (((xs + offset) % bw) < max(1, unit))
        return np.where(is_mortar, mortar, brick).astype(np.float32) * np.ones((h, w, 1), np.float32)  # fmt: skip
    raise ValueError(f"unknown stuff class {name!r}")


# --------------------------------------------------------------------------- things
@dataclass(frozen=True)
class ThingPlan:
    """A thing to draw: class, colour, box (pixels), flip, style per styled part, kept subparts."""

    cls: str
    color: str
    x0: float
    y0: float
    w: float
    h: float
    flip: bool
    styles: tuple[str, ...]  # one per template part
    keep_sub: tuple[tuple[bool, ...], ...]  # per part, per subpart


@dataclass
class Canvas:
    """Mutable state while drawing a scene: id maps, per-thing areas and part bookkeeping."""

    image: np.ndarray  # (H, W, 3) float32
    things: np.ndarray  # (H, W) int64 thing ids (1..), 0 = stuff
    parts: np.ndarray  # (H, W) int64 temporary part ids (1..), 0 = none
    subparts: np.ndarray  # (H, W) int64 temporary subpart ids (1..), 0 = none
    full_area: dict[int, int] = field(default_factory=dict)
    visible: dict[int, int] = field(default_factory=dict)
    plans: list[ThingPlan] = field(default_factory=list)
    part_meta: list[tuple[int, str, str]] = field(default_factory=list)  # (thing, name, style)
    sub_meta: list[tuple[int, str]] = field(default_factory=list)  # (part temp id, name)


def _allowed_style(cls: str, part: str, held_out: bool, rng: np.random.Generator) -> str:
    held = [s for c, p, s in HELD_OUT_COMPOSITIONS if c == cls and p == part]
    if held_out and held:
        return held[0]
    allowed = [s for s in STYLES if s not in held]
    return str(rng.choice(allowed))


def plan_thing(rng: np.random.Generator, cfg: SceneConfig) -> ThingPlan:
    cls = str(rng.choice(THING_CLASSES))
    template = TEMPLATES[cls]
    h = cfg.height * rng.uniform(cfg.min_scale, cfg.max_scale)
    w = h / template["aspect"]
    if w > 0.9 * cfg.width:  # keep wide things inside the image
        w = 0.9 * cfg.width
        h = w * template["aspect"]
    if cls == "bird":
        y1 = rng.uniform(h, cfg.height)
    else:
        y1 = rng.uniform(max(h, 0.45 * cfg.height), cfg.height)
    styles = tuple(
        _allowed_style(cls, name, cfg.held_out, rng) if styled else "solid"
        for name, _, _, styled, _ in template["parts"]
    )
    keep_sub = tuple(
        tuple(bool(rng.random() < 0.75) if sub[0] == "fruit" else True for sub in subparts)
        for *_, subparts in template["parts"]
    )
    return ThingPlan(
        cls=cls,
        color=str(rng.choice(list(COLORS))),
        x0=float(rng.uniform(0, cfg.width - w)),
        y0=float(y1 - h),
        w=float(w),
        h=float(h),
        flip=bool(template["flip"] and rng.random() < 0.5),
        styles=styles,
        keep_sub=keep_sub,
    )


def _rasterise(plan: ThingPlan, height: int, width: int):
    """Local part / subpart index maps of a thing inside its window.

    Returns (rows slice, cols slice, part_local (h, w) int64 (-1 = outside), sub_local (h, w) int64
    (-1 = none, else index into the flat list of the thing's subparts), flat subpart list of
    (part index, subpart template)).
    """
    r0, r1 = max(0, int(np.floor(plan.y0))), min(height, int(np.ceil(plan.y0 + plan.h)))
    c0, c1 = max(0, int(np.floor(plan.x0))), min(width, int(np.ceil(plan.x0 + plan.w)))
    u = (np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - plan.x0) / plan.w
    v = (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - plan.y0) / plan.h
    if plan.flip:
        u = 1.0 - u
    u, v = np.broadcast_arrays(u, v)
    part_local = np.full(u.shape, -1, dtype=np.int64)
    sub_local = np.full(u.shape, -1, dtype=np.int64)
    flat_subs: list[tuple[int, tuple]] = []
    for i, (_, prims, _, _, subparts) in enumerate(TEMPLATES[plan.cls]["parts"]):
        kept = [sub for sub, keep in zip(subparts, plan.keep_sub[i]) if keep]
        region = _union(prims, u, v)
        for sub in kept:
            region |= _union(sub[1], u, v)
        part_local[region] = i
        sub_local[region] = -1  # a later part covers earlier subparts
        for sub in kept:
            flat_subs.append((i, sub))
            sub_local[_union(sub[1], u, v) & region] = len(flat_subs) - 1
    return slice(r0, r1), slice(c0, c1), part_local, sub_local, flat_subs


def _role_color(role: str, thing_color: str) -> tuple[int, int, int] | np.ndarray:
    base = COLORS[thing_color]
    if role == "main":
        return np.asarray(base, dtype=np.float32)
    if role == "dark":
        return _shade(base, 0.6)
    if role == "light":
        return _shade(base, 1.45)
    return np.asarray(ROLE_COLORS[role], dtype=np.float32)


def _paint_thing(plan: ThingPlan, part_local, sub_local, flat_subs, rows, cols) -> np.ndarray:
    """(h, w, 3) float32 colours of a thing in its window (only meaningful where part_local >= 0)."""
    h, w = part_local.shape
    py = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - plan.y0
    px = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - plan.x0
    px, py = np.broadcast_arrays(px, py)
    period = max(3.0, plan.w / 7.0)
    out = np.zeros((h, w, 3), dtype=np.float32)
    for i, (_, _, role, _, _) in enumerate(TEMPLATES[plan.cls]["parts"]):
        sel = part_local == i
        if not sel.any():
            continue
        pattern = _style_pattern(plan.styles[i], px[sel], py[sel], period)
        color = _role_color(role, plan.color)
        out[sel] = np.clip(color[None, :] * pattern[:, None], 0, 255)
    for j, (_, sub) in enumerate(flat_subs):
        out[sub_local == j] = _role_color(sub[2], plan.color)
    # Dark outlines where the part or subpart changes, so that parts are visible as units.
    key = (part_local + 1) * 1000 + sub_local + 1
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= key[:, 1:] != key[:, :-1]
    edge[1:, :] |= key[1:, :] != key[:-1, :]
    out[edge] *= 0.65
    return out


def try_place(canvas: Canvas, plan: ThingPlan, cfg: SceneConfig) -> bool:
    """Draw `plan` if it keeps every earlier thing visible enough; returns whether it was drawn."""
    rows, cols, part_local, sub_local, flat_subs = _rasterise(plan, cfg.height, cfg.width)
    obj = part_local >= 0
    area = int(obj.sum())
    if area < cfg.min_pixels:
        return False
    covered = canvas.things[rows, cols][obj]
    ids, counts = np.unique(covered[covered > 0], return_counts=True)
    for tid, count in zip(ids.tolist(), counts.tolist()):
        left = canvas.visible[tid] - count
        if left < max(cfg.min_visible * canvas.full_area[tid], cfg.min_pixels):
            return False
    for tid, count in zip(ids.tolist(), counts.tolist()):
        canvas.visible[tid] -= count
    thing_id = len(canvas.plans) + 1
    canvas.plans.append(plan)
    canvas.full_area[thing_id] = canvas.visible[thing_id] = area

    template_parts = TEMPLATES[plan.cls]["parts"]
    part_ids = np.zeros(len(template_parts), dtype=np.int64)
    for i, (name, *_) in enumerate(template_parts):
        canvas.part_meta.append((thing_id, f"{plan.cls} {name}", plan.styles[i]))
        part_ids[i] = len(canvas.part_meta)
    sub_ids = np.zeros(len(flat_subs) + 1, dtype=np.int64)  # last entry: "no subpart" -> 0
    for j, (i, sub) in enumerate(flat_subs):
        canvas.sub_meta.append((int(part_ids[i]), f"{plan.cls} {sub[0]}"))
        sub_ids[j] = len(canvas.sub_meta)

    canvas.things[rows, cols][obj] = thing_id
    canvas.parts[rows, cols][obj] = part_ids[part_local[obj]]
    canvas.subparts[rows, cols][obj] = sub_ids[sub_local[obj]]  # -1 indexes the 0 at the end
    colors = _paint_thing(plan, part_local, sub_local, flat_subs, rows, cols)
    canvas.image[rows, cols][obj] = colors[obj]
    return True
