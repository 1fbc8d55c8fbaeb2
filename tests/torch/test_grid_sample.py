"""twicediff.torch.grid_sample against torch's ``F.grid_sample``: the same values and gradients (of
the input and of the grid) on generated inputs (both modes it computes, every padding mode, both
corner alignments, grids reaching outside the input, one-pixel inputs), forward mode equal to
reverse mode, second derivatives by finite differences, a spatial-transformer model through every
engine (func could not take it: torch has no forward-mode rule of the op), and torch's op kept for
what it leaves to it."""
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp

from same_as_torch import assert_same_values_and_gradients
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.grid_sample import grid_sample


def _draw(seed: int):
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = r.randint(1, 3), r.randint(1, 3), r.randint(1, 5), r.randint(1, 5)
    Ho, Wo = r.randint(1, 4), r.randint(1, 4)
    options = {"mode": r.choice(["bilinear", "nearest"]), "padding_mode": r.choice(["zeros", "border", "reflection"]),
               "align_corners": r.choice([True, False, None])}
    image = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    grid = torch.rand(N, Ho, Wo, 2, generator=gen, dtype=torch.float64) * 3.6 - 1.8  # a part outside [-1, 1]
    return f"seed {seed}: input {(N, C, H, W)} grid {(N, Ho, Wo)} {options}", image, grid, options


@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior")
@pytest.mark.parametrize("seed", range(120))
def test_values_and_gradients_are_torchs(seed):
    what, image, grid, options = _draw(seed)
    image, grid = image.requires_grad_(True), grid.requires_grad_(True)
    want, got = F.grid_sample(image, grid, **options), grid_sample(image, grid, **options)
    assert_same_values_and_gradients(got, want, (image, grid), what, rtol=1e-12, atol=1e-12, grad_rtol=1e-11,
                                     grad_atol=1e-12)


@pytest.mark.parametrize("seed", range(0, 120, 10))
def test_forward_mode_and_second_derivatives(seed):
    _, image, grid, options = _draw(seed)
    options["align_corners"] = bool(options["align_corners"])

    def sample(a, g):
        return grid_sample(a, g, **options)

    tangents = (torch.randn_like(image), torch.randn_like(grid))
    out, forward = jvp(sample, (image, grid), tangents)
    weights = torch.randn_like(out)
    _, pullback = vjp(sample, image, grid)
    back = pullback(weights)
    # ⟨w, J t⟩ = ⟨Jᵀ w, t⟩
    torch.testing.assert_close((weights * forward).sum(), sum((b * t).sum() for b, t in zip(back, tangents)))
    assert torch.autograd.gradgradcheck(sample, (image.requires_grad_(True), grid.requires_grad_(True)))


class _SpatialTransformer(nn.Module):
    """A localisation head predicting an affine map, F.affine_grid and F.grid_sample, a classifier."""

    def __init__(self, padding_mode: str):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.locate = nn.Linear(2, 6)
        self.head = nn.Linear(3 * 5 * 5, 3)
        self.padding_mode = padding_mode

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.1 * self.locate(x.mean((2, 3))).view(-1, 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 3, 5, 5], align_corners=False)
        moved = F.grid_sample(torch.tanh(self.conv(x)), grid, padding_mode=self.padding_mode, align_corners=False)
        return self.head(moved.flatten(1))


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_a_spatial_transformer_through_every_engine(padding_mode):
    torch.manual_seed(0)
    model = _SpatialTransformer(padding_mode).double().eval()
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(3, td.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap fallback of affine_grid: a performance note
        want = td.hvp(x, y, V, engine="autograd")
        for engine in ("auto", "func", "loop"):
            torch.testing.assert_close(td.hvp(x, y, V, engine=engine), want, rtol=1e-9, atol=1e-11, msg=engine)


def test_volumes_and_bicubic_sampling_are_torchs_op():
    gen = torch.Generator().manual_seed(0)
    volume, grid3 = torch.randn(1, 2, 3, 4, 5, generator=gen), torch.rand(1, 2, 2, 2, 3, generator=gen) * 2 - 1
    assert torch.equal(grid_sample(volume, grid3, align_corners=True), F.grid_sample(volume, grid3, align_corners=True))
    image, grid = torch.randn(1, 2, 4, 4, generator=gen), torch.rand(1, 3, 3, 2, generator=gen) * 2 - 1
    assert torch.equal(grid_sample(image, grid, mode="bicubic", align_corners=False),
                       F.grid_sample(image, grid, mode="bicubic", align_corners=False))


@pytest.mark.parametrize("call, words", [
    (lambda: grid_sample(torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 2, 2), mode="area"), "mode must be one of"),
    (lambda: grid_sample(torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 2, 2), padding_mode="wrap"),
     "padding_mode must be one of"),
    (lambda: grid_sample(torch.randn(2, 1, 3, 3), torch.zeros(1, 2, 2, 2)), r"grid must be \[N, Ho, Wo, 2\] with N = 2"),
    (lambda: grid_sample(torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 2, 3)), r"got \(1, 2, 2, 3\)"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(ValueError, match=words):
        call()
