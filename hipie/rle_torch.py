"""COCO run-length encoding in torch, vectorised over many masks, on any device.

COCO RLEs count alternating background / foreground runs over the pixels in column-major order
(down the first column, then the next), background first. Here:

- `parse_counts` turns the counts of N RLEs (compressed strings, or uncompressed lists) into one
  flat tensor of run lengths with per-mask offsets, parsing every string at once.
- `decode` gives dense ``(N, H, W)`` bool masks; `decode_cells` gives, without the full-resolution
  masks, each mask's exact pixel count in the cells of a coarser grid whose nearest-neighbour
  upsampling is the image (a model-resolution mask ``m`` upsampled to the image covers
  ``sum_c m[c] * cells[c]`` pixels of an RLE mask: the Eq. 5 intersections as one matmul).
- `encode` RLE-encodes ``(N, h, w)`` bool masks *as their nearest-neighbour upsampling to
  (H, W)* (the identity when the sizes agree), from the masks' row transitions: the
  full-resolution masks are never built. Only the final counts strings are built on the CPU
  (`schemas.rle.strings_from_counts`); areas and tight boxes come with them.

Nearest-neighbour follows ``torch.nn.functional.interpolate(mode="nearest")`` exactly (the index
maps are computed with it), so `encode(m, size)` equals encoding ``interpolate(m, size)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from schemas.rle import strings_from_counts

__all__ = [
    "EncodedMasks",
    "Runs",
    "decode",
    "decode_cells",
    "encode",
    "nearest_index",
    "parse_counts",
]


@dataclass(frozen=True)
class Runs:
    """Run lengths of N masks of one image size, flat: mask ``i`` owns
    ``values[offsets[i]:offsets[i + 1]]`` (background first, alternating)."""

    values: torch.Tensor  # (R,) int64
    offsets: torch.Tensor  # (N + 1,) int64
    height: int
    width: int

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def foreground(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mask (F,), start (F,), length (F,))`` of every non-empty foreground run; ``start``
        is the column-major pixel index."""
        values, offsets = self.values, self.offsets
        mask_of = _segment_ids(offsets, values.numel())
        index = torch.arange(values.numel(), device=values.device) - offsets[mask_of]
        ends = torch.cumsum(values, 0)
        first = torch.cat([ends.new_zeros(1), ends])[offsets[:-1]]  # run 0 of each mask
        starts = ends - values - first[mask_of]
        keep = (index % 2 == 1) & (values > 0)
        return mask_of[keep], starts[keep], values[keep]

    def areas(self) -> torch.Tensor:
        """``(N,)`` int64 foreground pixels per mask."""
        mask_of, _, length = self.foreground()
        out = torch.zeros(len(self), dtype=torch.int64, device=self.values.device)
        return out.index_add_(0, mask_of, length)


@dataclass(frozen=True)
class EncodedMasks:
    """What `encode` returns: COCO RLEs (text counts), areas and tight XYWH boxes."""

    rles: list[dict]
    areas: list[int]
    bboxes: list[list[float]]  # [x, y, w, h], [0, 0, 0, 0] for an empty mask


def parse_counts(rles: Sequence[dict], device: torch.device | str = "cpu") -> Runs:
    """Run lengths of N COCO RLEs of one size (compressed counts as str/bytes, or lists).

    The compressed format writes each value in 5-bit groups, least significant first, as
    characters ``48 + group``; 0x20 marks "more groups follow", 0x10 of the last group is the sign;
    from the fourth value on, a value is stored as the difference to the value two before it.
    The RLEs are expected valid (`pipeline.masks.sam_json` checks untrusted ones).
    """
    if not rles:
        raise ValueError("no RLEs given")
    sizes = {(int(r["size"][0]), int(r["size"][1])) for r in rles}
    if len(sizes) != 1:
        raise ValueError(f"RLEs of different sizes: {sorted(sizes)}")
    height, width = sizes.pop()
    device = torch.device(device)
    compressed = [not isinstance(r["counts"], list) for r in rles]
    if not any(compressed):
        lists = [torch.as_tensor(r["counts"], dtype=torch.int64) for r in rles]
        return _runs_from_lists(lists, height, width, device)
    texts = [_as_bytes(r["counts"]) if c else b"" for r, c in zip(rles, compressed)]
    values, counts = _parse_strings(texts, device)
    if not all(compressed):  # a mix: splice the uncompressed lists in
        parts = torch.split(values, counts.tolist())
        lists = [
            p if c else torch.as_tensor(r["counts"], dtype=torch.int64, device=device)
            for p, c, r in zip(parts, compressed, rles)
        ]
        return _runs_from_lists(lists, height, width, device)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return Runs(values=values, offsets=offsets, height=height, width=width)


def decode(rles: Sequence[dict] | Runs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense masks ``(N, H, W)`` bool on ``device`` (a column-major view: ``.contiguous()``
    copies it to row-major)."""
    runs = rles if isinstance(rles, Runs) else parse_counts(rles, device)
    n, height, width = len(runs), runs.height, runs.width
    mask_of, start, length = runs.foreground()
    total = height * width
    diff = torch.zeros(n, total + 1, dtype=torch.int8, device=runs.values.device)
    flat = diff.view(-1)
    ones = torch.ones_like(start, dtype=torch.int8)
    flat.index_add_(0, mask_of * (total + 1) + start, ones)
    flat.index_add_(0, mask_of * (total + 1) + start + length, -ones)
    dense = torch.cumsum(diff[:, :total], 1, dtype=torch.int8).view(torch.bool)
    return dense.view(n, width, height).transpose(1, 2)


def nearest_index(out_size: int, in_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(out_size,)`` long: the input index that nearest-neighbour resizing (as
    ``F.interpolate(mode="nearest")``) reads for every output index."""
    src = torch.arange(in_size, dtype=torch.float32, device=device)[None, None]
    return F.interpolate(src, size=out_size, mode="nearest")[0, 0].round().long()


def decode_cells(
    rles: Sequence[dict] | Runs,
    grid: tuple[int, int],
    device: torch.device | str = "cpu",
    *,
    chunk: int = 32,
) -> torch.Tensor:
    """Each mask's exact pixel count in every cell of a ``grid = (h, w)`` whose nearest-neighbour
    upsampling to the RLEs' size is the image: cell ``(i, j)`` holds the image pixels ``(y, x)``
    with ``rows[y] == i`` and ``cols[x] == j`` (`nearest_index`).

    Works on the runs, split at column boundaries, without full-resolution masks.

    Returns:
        ``(N, h * w)`` counts (row-major cells), uint8 when every cell holds at most 255 pixels,
        else int32.
    """
    runs = rles if isinstance(rles, Runs) else parse_counts(rles, device)
    dev = runs.values.device
    n, height, width = len(runs), runs.height, runs.width
    gh, gw = grid
    rows = nearest_index(height, gh, dev)  # (H,) cell row of every image row
    cols = nearest_index(width, gw, dev)  # (W,)
    cell_ids = torch.arange(gh, device=dev)
    row_start = torch.searchsorted(rows, cell_ids, right=False)  # (gh,) first image row
    row_end = torch.searchsorted(rows, cell_ids, right=True)  # (gh,) one past the last
    cell_h = row_end - row_start
    cell_w = torch.bincount(cols, minlength=gw)
    big = int(cell_h.max()) * int(cell_w.max()) > 255

    # Foreground runs split into one piece per image column: (mask, x, y0, y1).
    mask_of, start, length = runs.foreground()
    x0 = start // height
    x1 = (start + length - 1) // height
    pieces = x1 - x0 + 1
    which = torch.repeat_interleave(torch.arange(pieces.numel(), device=dev), pieces)
    k = torch.arange(which.numel(), device=dev) - (torch.cumsum(pieces, 0) - pieces)[which]
    first, last = k == 0, k == pieces[which] - 1
    mask_of, x = mask_of[which], x0[which] + k
    y0 = torch.where(first, start[which] % height, 0)
    y1 = torch.where(last, (start[which] + length[which] - 1) % height + 1, height)
    cy0, cy1, cx = rows[y0], rows[y1 - 1], cols[x]

    # Pieces inside one cell add their length there; longer ones add their partial end cells
    # and mark the whole cells in between, which a cumulative sum down each column fills in.
    one = cy0 == cy1
    point_cell = torch.cat([cy0, cy1[~one]])
    point_value = torch.cat(
        [torch.where(one, y1 - y0, row_end[cy0] - y0), (y1 - row_start[cy1])[~one]]
    )
    point_mask = torch.cat([mask_of, mask_of[~one]])
    point_col = torch.cat([cx, cx[~one]])
    span_mask, span_col = mask_of[~one], cx[~one]
    span_from, span_to = cy0[~one] + 1, cy1[~one]

    out = torch.empty(n, gh * gw, dtype=torch.int32 if big else torch.uint8, device=dev)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        m = hi - lo
        counts = torch.zeros(m * gh * gw, dtype=torch.int32, device=dev)
        sel = (point_mask >= lo) & (point_mask < hi)
        index = ((point_mask[sel] - lo) * gh + point_cell[sel]) * gw + point_col[sel]
        counts.index_add_(0, index, point_value[sel].to(torch.int32))
        marks = torch.zeros(m * (gh + 1) * gw, dtype=torch.int32, device=dev)
        sel = (span_mask >= lo) & (span_mask < hi)
        base = (span_mask[sel] - lo) * (gh + 1)
        ones = torch.ones(int(sel.sum()), dtype=torch.int32, device=dev)
        marks.index_add_(0, (base + span_from[sel]) * gw + span_col[sel], ones)
        marks.index_add_(0, (base + span_to[sel]) * gw + span_col[sel], -ones)
        full = torch.cumsum(marks.view(m, gh + 1, gw), 1)[:, :gh]  # whole cells per column
        counts = counts.view(m, gh, gw) + full * cell_h.to(torch.int32)[None, :, None]
        out[lo:hi] = counts.view(m, gh * gw).to(out.dtype)
    return out


def encode(masks: torch.Tensor, size: tuple[int, int] | None = None) -> EncodedMasks:
    """COCO RLEs of ``(N, h, w)`` bool masks, nearest-upsampled to ``size = (H, W)`` (default:
    their own size), with areas and tight boxes in ``size`` pixels.

    Transitions are found on the masks' device at their resolution; only the counts strings are
    built on the CPU.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, h, w), got {tuple(masks.shape)}")
    n, h, w = masks.shape
    height, width = (h, w) if size is None else (int(size[0]), int(size[1]))
    if n == 0:
        return EncodedMasks(rles=[], areas=[], bboxes=[])
    dev = masks.device
    masks = masks.bool()
    rows = nearest_index(height, h, dev)  # (H,) mask row of every image row
    cols = nearest_index(width, w, dev)  # (W,)

    # Changes inside a column: image rows y >= 1 whose mask row differs from row y - 1's, where
    # the two mask rows differ.
    steps = torch.nonzero(rows[1:] != rows[:-1]).flatten() + 1  # (T,) image rows
    if steps.numel() == h - 1:  # every mask row shown (upsampling): no gathers
        flips = masks[:, 1:] != masks[:, :-1]  # (N, h - 1, w)
    else:
        flips = masks[:, rows[steps], :] != masks[:, rows[steps - 1], :]  # (N, T, w)
    flat = _nonzero_flat(flips)
    f_col = flat % w
    f_step = (flat // w) % steps.numel()
    f_mask = flat // (w * steps.numel())
    # Every image column showing mask column j repeats its changes.
    col_count = torch.bincount(cols, minlength=w)
    col_first = torch.cumsum(col_count, 0) - col_count
    reps = col_count[f_col]
    which = torch.repeat_interleave(torch.arange(f_col.numel(), device=dev), reps)
    k = torch.arange(which.numel(), device=dev) - (torch.cumsum(reps, 0) - reps)[which]
    inner_mask = f_mask[which]
    inner_pos = (col_first[f_col][which] + k) * height + steps[f_step][which]
    # Changes at column starts: the first pixel of column x against the last of column x - 1.
    # Inside a run of image columns showing one mask column j, that is top[j] != bottom[j]; at
    # the first image column of j, top[j] against the bottom of the mask column shown before.
    top, bottom = masks[:, rows[0], :], masks[:, rows[-1], :]  # (N, w)
    shown = torch.nonzero(col_count).flatten()  # mask columns some image column shows
    edge = top[:, shown].clone()  # (N, J) changes at the first image column of each
    edge[:, 1:] ^= bottom[:, shown[:-1]]
    e_mask, e_j = torch.nonzero(edge, as_tuple=True)
    e_col = col_first[shown[e_j]]
    same_mask, same_j = torch.nonzero((top != bottom) & (col_count > 1), as_tuple=True)
    reps = col_count[same_j] - 1
    which = torch.repeat_interleave(torch.arange(same_j.numel(), device=dev), reps)
    k = torch.arange(which.numel(), device=dev) - (torch.cumsum(reps, 0) - reps)[which]
    s_mask = torch.cat([e_mask, same_mask[which]])
    s_col = torch.cat([e_col, col_first[same_j][which] + 1 + k])
    change_mask = torch.cat([inner_mask, s_mask])
    change_pos = torch.cat([inner_pos, s_col * height])
    total = height * width
    order = torch.argsort(change_mask * (total + 1) + change_pos)
    change_mask, change_pos = change_mask[order], change_pos[order]
    per_mask = torch.bincount(change_mask, minlength=n)

    # Counts: differences of [0, changes..., H*W] per mask.
    offsets = torch.cumsum(per_mask + 1, 0) - (per_mask + 1)  # where each mask's counts start
    slot = (
        torch.arange(change_pos.numel(), device=dev)
        - (torch.cumsum(per_mask, 0) - per_mask)[change_mask]
    )
    ends = torch.full((int(per_mask.sum()) + n,), total, dtype=torch.int64, device=dev)
    ends[offsets[change_mask] + slot] = change_pos
    starts = torch.zeros_like(ends)
    starts[offsets[change_mask] + slot + 1] = change_pos
    counts = ends - starts

    # Areas: the sums of the odd (foreground) runs.
    count_mask = torch.repeat_interleave(torch.arange(n, device=dev), per_mask + 1)
    odd = (torch.arange(counts.numel(), device=dev) - offsets[count_mask]) % 2 == 1
    areas = torch.zeros(n, dtype=torch.int64, device=dev)
    areas.index_add_(0, count_mask[odd], counts[odd])
    # Tight boxes from the foreground runs; a run over a column boundary spans every row.
    ends = torch.cumsum(counts, 0)
    ends = ends - torch.cat([ends.new_zeros(1), ends])[offsets][count_mask]  # within each mask
    run_mask, last = count_mask[odd & (counts > 0)], ends[odd & (counts > 0)] - 1
    first = last - counts[odd & (counts > 0)] + 1
    x0, x1 = first // height, last // height
    spans = x1 > x0
    y0 = torch.where(spans, 0, first % height)
    y1 = torch.where(spans, height - 1, last % height)
    lo = torch.full((2, n), total, dtype=torch.int64, device=dev)
    lo.scatter_reduce_(1, run_mask.expand(2, -1), torch.stack([x0, y0]), "amin")
    hi = torch.full((2, n), -1, dtype=torch.int64, device=dev)
    hi.scatter_reduce_(1, run_mask.expand(2, -1), torch.stack([x1, y1]), "amax")
    empty = areas == 0
    lo = torch.where(empty, 0, lo)
    hi = torch.where(empty, -1, hi)
    xs, ys = (lo[0], hi[0] + 1), (lo[1], hi[1] + 1)

    counts_cpu = counts.cpu().numpy()
    bounds = torch.cat([offsets, offsets.new_tensor([counts.numel()])]).cpu().numpy()
    strings = strings_from_counts(counts_cpu, bounds)
    boxes = torch.stack([xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0]], 1).cpu().tolist()
    return EncodedMasks(
        rles=[{"size": [height, width], "counts": s} for s in strings],
        areas=areas.cpu().tolist(),
        bboxes=[[float(v) for v in b] for b in boxes],
    )


# --------------------------------------------------------------------------------------------


def _nonzero_flat(x: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a bool tensor, in order.

    Scans 8 bytes at a time (int64 words) and looks into the non-zero words only, which is
    several times faster on the CPU than ``nonzero`` when few entries are set.
    """
    flat = x.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    hot = torch.nonzero(words).flatten()  # (Wn,)
    candidates = (hot[:, None] * 8 + torch.arange(8, device=x.device)).flatten()
    return candidates[flat[candidates]]


def _as_bytes(counts) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


def _segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``(total,)`` the segment of every element, for segments given by ``offsets (N + 1,)``."""
    return torch.repeat_interleave(
        torch.arange(offsets.numel() - 1, device=offsets.device),
        offsets[1:] - offsets[:-1],
        output_size=total,
    )


def _runs_from_lists(lists: list[torch.Tensor], height: int, width: int, device) -> Runs:
    counts = torch.tensor([t.numel() for t in lists], dtype=torch.int64)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(device)
    values = torch.cat(lists).to(device) if lists else torch.zeros(0, dtype=torch.int64)
    return Runs(values=values, offsets=offsets, height=height, width=width)


def _parse_strings(texts: list[bytes], device) -> tuple[torch.Tensor, torch.Tensor]:
    """All counts strings at once -> (values (R,) int64, values per string (N,) int64)."""
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.int64)
    joined = b"".join(texts)
    if not joined:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros_like(lengths)
    chars = torch.frombuffer(bytearray(joined), dtype=torch.uint8).to(device).long() - 48
    lengths = lengths.to(device)
    more = (chars & 0x20) != 0
    ends = torch.nonzero(~more).flatten()  # last character of every value
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    groups = ends - starts + 1
    value_of_char = _segment_ids(torch.cat([starts, ends[-1:] + 1]), chars.numel())
    shift = 5 * (torch.arange(chars.numel(), device=device) - starts[value_of_char])
    values = torch.zeros(ends.numel(), dtype=torch.int64, device=device)
    values.index_add_(0, value_of_char, (chars & 0x1F) << shift)
    negative = (chars[ends] & 0x10) != 0
    values = values - (negative.long() << (5 * groups))
    # Values per string: the strings end on value ends, so count value ends per string.
    string_end = torch.cumsum(lengths, 0)  # one past each string's last character
    per_string = torch.searchsorted(ends, string_end, right=False)
    per_string = per_string - torch.cat([per_string.new_zeros(1), per_string[:-1]])
    # Undo the delta coding: value m >= 3 of a mask is stored minus value m - 2, so runs are
    # running sums over the odd values and over the even values from index 2, per mask.
    offsets = torch.cat([per_string.new_zeros(1), torch.cumsum(per_string, 0)])
    mask_of = _segment_ids(offsets, values.numel())
    index = torch.arange(values.numel(), device=device) - offsets[mask_of]
    odd = index % 2 == 1
    chained = torch.stack([torch.where(odd, values, 0), torch.where(odd | (index == 0), 0, values)])
    sums = torch.cumsum(chained, 1)
    before = torch.cat([sums.new_zeros(2, 1), sums], 1)[:, offsets[:-1]]  # (2, N)
    sums = sums - before[:, mask_of]
    runs = torch.where(index == 0, values, torch.where(odd, sums[0], sums[1]))
    return runs, per_string
