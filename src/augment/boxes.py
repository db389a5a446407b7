"""Per-sample rectangles shared by the erasing and mixing ops, sampled and rasterised for a whole batch
at once. Boxes are integer pixel bounds `(y1, y2, x1, x2)`, each a `(B,)` tensor, half-open like slices."""

from __future__ import annotations

import torch


def centered_boxes(
    b: int, h: int, w: int, box_h: torch.Tensor | int, box_w: torch.Tensor | int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes of (up to) `box_h` x `box_w` pixels centred on a uniformly random pixel and clipped to the
    image, so boxes near the border are smaller. This is the box of Cutout (DeVries & Taylor 2017) and
    of CutMix (Yun et al. 2019) in PaddleClas and timm: `clip(c - size // 2, 0, side)` to
    `clip(c + size // 2, 0, side)` with `c = randint(side)`."""
    half_h = torch.as_tensor(box_h, device=device) // 2
    half_w = torch.as_tensor(box_w, device=device) // 2
    cy = torch.randint(0, h, (b,), device=device)
    cx = torch.randint(0, w, (b,), device=device)
    return (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h), (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)


def box_mask(boxes: tuple[torch.Tensor, ...], h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) bool mask, True inside each sample's box."""
    y1, y2, x1, x2 = (v.view(-1, 1, 1) for v in boxes)
    rows = torch.arange(h, device=y1.device).view(1, h, 1)
    cols = torch.arange(w, device=y1.device).view(1, 1, w)
    return ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)).unsqueeze(1)
