"""The fused solver-step ops (cg_step, cg_direction, lissa_step) against their pure-torch references."""
import pytest
import torch

from twicediff import ops as _ops
from twicediff.ops import reference as _reference

SHAPES = [(0, 5), (3, 0), (1, 1), (4, 7), (2, 1000)]
DTYPES = [torch.float32, torch.float64]


def _block(D, P, dtype, device, contiguous, seed):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(D, P, generator=g, dtype=dtype).to(device)
    return torch.randn(P, D, generator=g, dtype=dtype).to(device).T  # column-major view


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_cg_step_matches_reference(device, shape, dtype, contiguous):
    D, P = shape
    x, r, p, Ap = (_block(D, P, dtype, device, contiguous, s) for s in range(4))
    alpha = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device)
    xr, rr = x.clone(), r.clone()
    want = _reference.cg_step(xr, rr, p, Ap, alpha)
    got = _ops.cg_step(x, r, p, Ap, alpha)
    assert got.dtype == torch.float64 and got.shape == (D,)
    torch.testing.assert_close(x, xr, **_tol(dtype))
    torch.testing.assert_close(r, rr, **_tol(dtype))
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_cg_direction_matches_reference(device, shape, dtype, contiguous):
    D, P = shape
    p, z = (_block(D, P, dtype, device, contiguous, s) for s in range(2))
    beta = torch.rand(D, dtype=torch.float64).to(device)
    want = _reference.cg_direction(p.clone(), z, beta)
    _ops.cg_direction(p, z, beta)
    torch.testing.assert_close(p, want, **_tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_lissa_step_matches_reference(device, shape, dtype, contiguous):
    D, P = shape
    h, b, Hh = (_block(D, P, dtype, device, contiguous, s) for s in range(3))
    if D and P:
        h[0, 0] = 0.0  # an entry that stays 0 (0/0 counts as 0)
        b[0, 0] = Hh[0, 0] = 0.0
    href = h.clone()
    want = _reference.lissa_step(href, b, Hh, 0.1, 7.0, 0.3)
    got = _ops.lissa_step(h, b, Hh, 0.1, 7.0, 0.3)
    torch.testing.assert_close(h, href, **_tol(dtype))
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == (D,)
        torch.testing.assert_close(g, w, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)


def test_lissa_step_flags_non_finite_rows(device):
    h = torch.ones(3, 4, dtype=torch.float64, device=device)
    b = torch.zeros_like(h)
    Hh = torch.zeros_like(h)
    Hh[1, 2] = float("inf")
    mx, sm = _ops.lissa_step(h, b, Hh, 0.0, 1.0, 0.0)
    assert torch.isnan(mx[1]) and torch.isnan(sm[1])
    assert torch.isfinite(mx[[0, 2]]).all() and torch.isfinite(sm[[0, 2]]).all()


def test_lissa_step_formula(device):
    """One explicit entry: h' = b + (1 - d) h - (Hh + λ h)/s."""
    h = torch.tensor([[2.0]], dtype=torch.float64, device=device)
    b = torch.tensor([[1.0]], dtype=torch.float64, device=device)
    Hh = torch.tensor([[4.0]], dtype=torch.float64, device=device)
    mx, sm = _ops.lissa_step(h, b, Hh, 0.5, 2.0, 1.0)
    assert h.item() == pytest.approx(1.0 + 0.5 * 2.0 - (4.0 + 2.0) / 2.0)  # = -1
    assert mx.item() == pytest.approx(3.0) and sm.item() == pytest.approx(3.0)


def test_errors_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="r must have the shape of x"):
        _ops.cg_step(x, torch.zeros(2, 4), x.clone(), x.clone(), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="p must have the dtype of x"):
        _ops.cg_step(x, x.clone(), x.double(), x.clone(), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="alpha must be float64"):
        _ops.cg_step(x, x.clone(), x.clone(), x.clone(), torch.zeros(2))
    with pytest.raises(ValueError, match=r"alpha must have shape \[D\] = \[2\]"):
        _ops.cg_step(x, x.clone(), x.clone(), x.clone(), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be a 2-d"):
        _ops.cg_direction(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        _ops.cg_direction(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64),
                          torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="must not share memory"):
        _ops.cg_step(x, x, x.clone(), x.clone(), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlapping memory"):
        _ops.cg_direction(torch.zeros(1, 3).expand(2, 3), x, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must be finite and non-zero"):
        _ops.lissa_step(x.clone(), x.clone(), x.clone(), 0.0, 0.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    D, P = 3, 5
    mk = lambda: torch.randn(D, P, dtype=dtype, device=device)  # noqa: E731
    coef = torch.rand(D, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.twicediff.cg_step.default, (mk(), mk(), mk(), mk(), coef))
    torch.library.opcheck(torch.ops.twicediff.cg_direction.default, (mk(), mk(), coef))
    torch.library.opcheck(torch.ops.twicediff.lissa_step.default, (mk(), mk(), mk(), 0.1, 10.0, 0.2))
