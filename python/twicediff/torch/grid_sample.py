"""``F.grid_sample`` as forward-mode products need it.

torch (2.14) computes ``F.grid_sample`` (spatial transformer networks, flow warping, deformable
sampling) with ``grid_sampler_2d``, which has no forward-mode rule, so the forward-over-reverse
engines (func, compiled) could not take such a model and ``auto`` fell back to reverse mode.
:func:`grid_sample` computes the same 2-D bilinear and nearest sampling from gathers of the input
at the taps around each grid point, in ops torch differentiates in both modes and batches under
vmap; :mod:`twicediff.torch.forward_mode` routes the model's calls to it inside batched forward-mode
and compiled products. Volumetric (5-D) input and bicubic sampling keep torch's op.

Coordinates follow torch: ``align_corners`` maps −1 and 1 to the centres (True) or the outer
edges (False) of the corner pixels; ``padding_mode`` "zeros" reads 0 outside the input, "border"
clamps to its edge and "reflection" reflects about it. Their derivatives are torch's: 0 in the
coordinate where it is clamped, the sign flipped where it is reflected, and in nearest mode 0 in
the grid (rounding).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["grid_sample"]

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


def _unnormalize(coord: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _reflect(coord: torch.Tensor, twice_low: int, twice_high: int) -> torch.Tensor:
    """``coord`` reflected into [twice_low / 2, twice_high / 2] (torch's ``reflect_coordinates``)."""
    if twice_low == twice_high:
        return torch.zeros_like(coord)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    distance = (coord - low).abs()
    extra = torch.fmod(distance, span)
    flips = torch.floor(distance / span).detach()
    return torch.where(torch.fmod(flips, 2) == 0, extra + low, span - extra + low)


def _source(coord: torch.Tensor, size: int, padding_mode: str, align_corners: bool) -> torch.Tensor:
    """Pixel coordinates of normalised ones, after the padding mode's clamp or reflection."""
    coord = _unnormalize(coord, size, align_corners)
    if padding_mode == "reflection":
        coord = _reflect(coord, 0, 2 * (size - 1)) if align_corners else _reflect(coord, -1, 2 * size - 1)
    if padding_mode in ("border", "reflection"):
        coord = coord.clamp(0, size - 1)
    return coord


def _taps(flat: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """input[n, :, iy, ix] for integer-valued coordinates [N, Ho, Wo]; 0 where they fall outside."""
    inside = (ix >= 0) & (ix <= W - 1) & (iy >= 0) & (iy <= H - 1)
    index = (iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)).long()  # [N, Ho, Wo]
    N, C = flat.shape[:2]
    values = flat.gather(2, index.reshape(N, 1, -1).expand(N, C, -1)).reshape(N, C, *index.shape[1:])
    return values * inside.unsqueeze(1).to(values.dtype)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: Optional[bool] = None) -> torch.Tensor:
    """``F.grid_sample``: input [N, C, H, W] sampled at grid [N, Ho, Wo, 2] (x, y in [−1, 1]),
    giving [N, C, Ho, Wo]; other ranks and bicubic mode are torch's op."""
    if mode not in MODES:
        raise ValueError(f"grid_sample: mode must be one of {MODES}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"grid_sample: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if input.dim() != 4 or mode == "bicubic":
        return F.grid_sample(input, grid, mode, padding_mode, align_corners)
    if grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid_sample: for input {tuple(input.shape)}, grid must be [N, Ho, Wo, 2] with N = "
                         f"{input.shape[0]}, got {tuple(grid.shape)}")
    align_corners = bool(align_corners)  # torch's default (None) is False, with a warning it gives itself
    N, C, H, W = input.shape
    flat = input.reshape(N, C, H * W)
    x = _source(grid[..., 0], W, padding_mode, align_corners)
    y = _source(grid[..., 1], H, padding_mode, align_corners)
    if mode == "nearest":  # round half to even, as torch's nearbyint: no derivative in the grid
        return _taps(flat, torch.round(x).detach(), torch.round(y).detach(), H, W)
    x0, y0 = torch.floor(x).detach(), torch.floor(y).detach()
    wx, wy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)  # weights of the taps at x0 + 1, y0 + 1
    top = _taps(flat, x0, y0, H, W) * (1 - wx) + _taps(flat, x0 + 1, y0, H, W) * wx
    bottom = _taps(flat, x0, y0 + 1, H, W) * (1 - wx) + _taps(flat, x0 + 1, y0 + 1, H, W) * wx
    return top * (1 - wy) + bottom * wy
