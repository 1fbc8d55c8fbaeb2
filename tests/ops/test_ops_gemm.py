"""The gemm_ op (out = beta out + alpha a b) against its pure-torch twin, per device, and its argument checks."""
import pytest
import torch

from twicediff import ops as _ops
from twicediff.ops import reference as _reference

SHAPES = [(1, 1, 1), (37, 33, 70), (130, 65, 300), (5, 1, 9), (0, 4, 3), (4, 0, 3), (4, 3, 0), (257, 129, 17)]
LAYOUTS = ["plain", "a_t", "b_t", "both_t", "strided", "out_t", "out_block"]


def _case(device, dtype, m, k, n, layout, gen):
    """a [M, K], b [K, N], out [M, N] (random contents) in the given memory layout; float64
    copies of a, b and out for the reference."""
    a64 = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(k, n, generator=gen, dtype=torch.float64)
    o64 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    a, b, out = cast(a64), cast(b64), cast(o64)
    if layout in ("a_t", "both_t"):
        a = cast(a64.t().contiguous()).t()
    if layout in ("b_t", "both_t"):
        b = cast(b64.t().contiguous()).t()
    if layout == "strided":  # every other column of a wider matrix
        a = cast(torch.stack([a64, a64], dim=2).reshape(m, 2 * k))[:, ::2]
        b = cast(torch.stack([b64, b64], dim=2).reshape(k, 2 * n))[:, ::2]
    if layout == "out_t":
        out = cast(o64.t().contiguous()).t()
    if layout == "out_block":  # rows of a wider, taller matrix (as a trailing-update block)
        big = torch.zeros(m + 3, n + 5, dtype=dtype, device=device)
        out = big[1:m + 1, 2:n + 2]
        out.copy_(o64)
    return a, b, out, (a.double().cpu().clone(), b.double().cpu().clone(), out.double().cpu().clone())


@pytest.mark.parametrize("backend", ["auto", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("beta, alpha", [(0.0, 1.0), (1.0, 1.0), (-0.5, 2.0), (1.0, -1.0), (0.0, -0.5)])
def test_gemm_matches_reference(device, monkeypatch, backend, dtype, beta, alpha):
    """Every shape and layout, against the float64 twin; float32 to 1e-5 of the largest entry (the
    oneDNN and BLAS kernels sum in different orders)."""
    monkeypatch.setenv("TWICEDIFF_CPU_GEMM", backend)
    gen = torch.Generator().manual_seed(7)
    for m, k, n in SHAPES:
        for layout in LAYOUTS:
            a, b, out, (a64, b64, o64) = _case(device, dtype, m, k, n, layout, gen)
            got = _ops.gemm_(out, a, b, beta, alpha)
            assert got is out
            want = _reference.gemm_(o64, a64, b64, beta, alpha)
            scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
            err = float((out.double().cpu() - want).abs().max()) if want.numel() else 0.0
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert err <= tol * scale * max(k, 1) ** 0.5, (m, k, n, layout, err)


def test_gemm_beta_zero_ignores_out(device):
    """beta = 0 does not read out: NaN and inf there leave no trace (BLAS semantics)."""
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(40, 30, dtype=dtype, device=device)
        b = torch.randn(30, 20, dtype=dtype, device=device)
        out = torch.full((40, 20), float("nan"), dtype=dtype, device=device)
        out[0, 0] = float("inf")
        _ops.gemm_(out, a, b)
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


def test_gemm_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        args = (torch.randn(6, 4, dtype=dtype, device=device), torch.randn(6, 5, dtype=dtype, device=device),
                torch.randn(5, 4, dtype=dtype, device=device), 0.5, -2.0)
        torch.library.opcheck(torch.ops.twicediff.gemm_.default, args)


def test_gemm_bad_arguments_name_them(device):
    f = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    cases = [
        ((f(3, 4), f(3), f(5, 4)), ValueError, "a must be a 2-d"),
        ((f(3, 4), f(3, 5), f(5, 4, 1)), ValueError, "b must be a 2-d"),
        ((f(12), f(3, 5), f(5, 4)), ValueError, "out must be a 2-d"),
        ((f(3, 4), f(3, 5), f(6, 4)), ValueError, "must agree in K"),
        ((f(3, 3), f(3, 5), f(5, 4)), ValueError, r"out must have shape \[M, N\] = \[3, 4\]"),
        ((f(3, 4), f(3, 5, dtype=torch.float64), f(5, 4)), TypeError, "a must have the dtype of out"),
        ((f(3, 4, dtype=torch.float64), f(3, 5, dtype=torch.float64), f(5, 4)), TypeError, "b must have the dtype"),
        ((torch.zeros(3, 4, dtype=torch.int64, device=device), torch.zeros(3, 5, dtype=torch.int64, device=device),
          torch.zeros(5, 4, dtype=torch.int64, device=device)), TypeError, "out must be floating point"),
        ((f(1, 4).expand(3, 4), f(3, 5), f(5, 4)), ValueError, "overlapping memory"),
    ]
    for args, exc, words in cases:
        with pytest.raises(exc, match=words):
            _ops.gemm_(*args)
    x = f(4, 4)
    with pytest.raises(ValueError, match="must not share memory with a"):
        _ops.gemm_(x, x, f(4, 4))
    with pytest.raises(ValueError, match="must not share memory with b"):
        _ops.gemm_(x[:, :2], f(4, 2), x[:2, 2:])
    with pytest.raises(ValueError, match="out requires grad"):
        _ops.gemm_(f(3, 4).requires_grad_(), f(3, 5), f(5, 4))
    with pytest.raises(TypeError, match="beta must be a number"):
        _ops.gemm_(f(3, 4), f(3, 5), f(5, 4), beta="1")
    with pytest.raises(TypeError, match="alpha must be a number"):
        _ops.gemm_(f(3, 4), f(3, 5), f(5, 4), alpha=None)
    with pytest.raises(TypeError, match="a must be a tensor"):
        _ops.gemm_(f(3, 4), [[1.0]], f(5, 4))
    if device.type == "cuda":
        with pytest.raises(ValueError, match="a must be on the device of out"):
            _ops.gemm_(f(3, 4), torch.randn(3, 5), f(5, 4))
