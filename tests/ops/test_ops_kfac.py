"""The K-FAC ops (kfac_covariance_, kfac_eigen_correction_) against their pure-torch references,
on awkward shapes, dtypes, strides and masks; opcheck; errors that name the argument."""
import itertools

import pytest
import torch

from twicediff.ops import reference as ref
from twicediff.ops import kfac as ops

IN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUT_DTYPES = [torch.float32, torch.float64]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(R, d, dtype, device, contiguous, seed):
    if contiguous:
        return torch.randn(R, d, generator=_gen(seed), dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.randn(d, R, generator=_gen(seed), dtype=torch.float64).to(device=device, dtype=dtype).T


def _orthogonal(n, device, seed):
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64, device=device)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q.to(device)


def _weights(kind, shape, device, seed):
    if kind is None:
        return None
    if kind == "float":
        return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64).to(device)
    if kind == "bool":
        return (torch.rand(*shape, generator=_gen(seed)) > 0.4).to(device)
    return torch.zeros(*shape, dtype=torch.float32, device=device)  # all masked out


def _tol(out_dtype, scale):
    if out_dtype == torch.float64:
        return dict(rtol=1e-11, atol=1e-11 * scale)
    return dict(rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (1, 5), (7, 1), (33, 6), (5, 0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weights", [None, "float", "bool", "zero"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_covariance_matches_reference(device, shape, bias, weights, contiguous):
    R, d = shape
    for in_dtype, out_dtype in itertools.product(IN_DTYPES, OUT_DTYPES):
        x = _rows(R, d, in_dtype, device, contiguous, 1)
        w = _weights(weights, (R,), device, 2)
        D = d + bias
        start = torch.randn(D, D, generator=_gen(3), dtype=torch.float64).to(device=device, dtype=out_dtype)
        want = ref.kfac_covariance_(start.clone().double(), x, w, bias)
        got = ops.covariance_accumulate(start.clone(), x, w, bias)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), want, **_tol(out_dtype, max(R, 1) * 4))


def test_covariance_into_a_strided_view(device):
    big = torch.zeros(6, 12, dtype=torch.float64, device=device)
    out = big[1:5, ::3]  # [4, 4] with strides (12, 3)
    x = torch.randn(9, 3, dtype=torch.float64, device=device)
    ops.covariance_accumulate(out, x, None, True)
    want = ref.kfac_covariance_(torch.zeros(4, 4, dtype=torch.float64, device=device), x, None, True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    big[1:5, ::3] = 0
    assert (big == 0).all()  # nothing written outside the view


def test_covariance_many_rows_cross_chunks(device):
    """More rows than one chunk holds (the chunk is ~4M elements): the chunks add up."""
    x = torch.randn(1 << 20, 5, dtype=torch.float32, device=device)
    got = ops.covariance_accumulate(torch.zeros(6, 6, dtype=torch.float64, device=device), x, None, True)
    want = ref.kfac_covariance_(torch.zeros(6, 6, dtype=torch.float64, device=device), x, None, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-6)


EC_SHAPES = [  # N, T, O, I
    (0, 3, 2, 2), (3, 0, 2, 2), (1, 1, 1, 1), (1, 1, 3, 0), (4, 1, 3, 5), (5, 3, 1, 4), (6, 4, 3, 2), (9, 7, 5, 6),
]


@pytest.mark.parametrize("shape", EC_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weights", [None, "float", "bool", "zero"])
@pytest.mark.parametrize("chunk", [0, 1, 4])
def test_eigen_correction_matches_reference(device, shape, bias, weights, chunk):
    N, T, O, I = shape
    Ip = I + bias
    for in_dtype, out_dtype in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                (torch.bfloat16, torch.float32), (torch.float16, torch.float64)]:
        g = torch.randn(N, T, O, generator=_gen(1), dtype=torch.float64).to(device=device, dtype=in_dtype)
        a = torch.randn(N, T, I, generator=_gen(2), dtype=torch.float64).to(device=device, dtype=in_dtype)
        q_s, q_a = _orthogonal(O, device, 3), _orthogonal(Ip, device, 4)
        w = _weights(weights, (N, T), device, 5)
        start = torch.rand(O, Ip, generator=_gen(6), dtype=torch.float64).to(device=device, dtype=out_dtype)
        want = ref.kfac_eigen_correction_(start.clone().double(), g, a, q_s, q_a, w, bias)
        got = ops.eigen_correction_accumulate(start.clone(), g, a, q_s, q_a, w, bias, chunk)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), want, **_tol(out_dtype, max(N * T * T, 1) * 4))
        if weights == "zero":
            torch.testing.assert_close(got, start, rtol=0, atol=0)


def test_eigen_correction_non_contiguous(device):
    N, T, O, I = 4, 3, 5, 2
    g = torch.randn(O, T, N, dtype=torch.float64, device=device).permute(2, 1, 0)
    a = torch.randn(I, N, T, dtype=torch.float64, device=device).permute(1, 2, 0)
    q_s = _orthogonal(O, device, 1).T  # a transposed view: still orthogonal
    q_a = _orthogonal(I + 1, device, 2).T
    big = torch.zeros(O, 2 * (I + 1), dtype=torch.float64, device=device)
    out = big[:, ::2]
    w = torch.rand(T, N, dtype=torch.float64, device=device).T
    ops.eigen_correction_accumulate(out, g, a, q_s, q_a, w, True, 2)
    want = ref.kfac_eigen_correction_(torch.zeros(O, I + 1, dtype=torch.float64, device=device), g, a, q_s, q_a,
                                           w, True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert (big[:, 1::2] == 0).all()


@pytest.mark.parametrize("strided", [False, True])
def test_eigen_correction_products_across_tiles(device, strided):
    """Per-sample products of more than one tile (the CPU forms 2^18 elements of them per batched
    GEMM): N = 150 samples of [64, 65] products are 2.5M elements, squared and summed tile by
    tile, into a contiguous or a strided accumulator."""
    N, T, O, I = 150, 3, 64, 64
    g = torch.randn(N, T, O, generator=_gen(1), dtype=torch.float64).to(device)
    a = torch.randn(N, T, I, generator=_gen(2), dtype=torch.float64).to(device)
    q_s, q_a = _orthogonal(O, device, 3), _orthogonal(I + 1, device, 4)
    w = _weights("float", (N, T), device, 5)
    big = torch.zeros(O, 2 * (I + 1), dtype=torch.float64, device=device)
    out = big[:, ::2] if strided else torch.zeros(O, I + 1, dtype=torch.float64, device=device)
    ops.eigen_correction_accumulate(out, g, a, q_s, q_a, w, True)
    want = ref.kfac_eigen_correction_(torch.zeros(O, I + 1, dtype=torch.float64, device=device), g, a, q_s, q_a,
                                      w, True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if strided:
        assert (big[:, 1::2] == 0).all()


def test_one_token_is_the_square_of_per_sample_outer_products(device):
    """T = 1: Σ_n (Q_Sᵀ g_n)² (Q_Aᵀ ā_n)²ᵀ, written out independently."""
    N, O, I = 6, 3, 4
    g = torch.randn(N, 1, O, dtype=torch.float64, device=device)
    a = torch.randn(N, 1, I, dtype=torch.float64, device=device)
    q_s, q_a = _orthogonal(O, device, 1), _orthogonal(I + 1, device, 2)
    abar = torch.cat([a[:, 0], torch.ones(N, 1, dtype=torch.float64, device=device)], 1)
    want = sum(torch.outer((q_s.T @ g[n, 0]) ** 2, (q_a.T @ abar[n]) ** 2) for n in range(N))
    got = ops.eigen_correction_accumulate(torch.zeros(O, I + 1, dtype=torch.float64, device=device), g, a, q_s, q_a,
                                          None, True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_errors_name_the_argument():
    out = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"out must have shape \[4, 4\]"):
        ops.covariance_accumulate(out, torch.zeros(5, 3), None, True)
    with pytest.raises(ValueError, match="x must be a 2-d"):
        ops.covariance_accumulate(out, torch.zeros(5, 3, 1))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        ops.covariance_accumulate(out, torch.zeros(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="out .the accumulator. must be float32 or float64"):
        ops.covariance_accumulate(torch.zeros(3, 3, dtype=torch.float16), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"weights must have shape \[5\]"):
        ops.covariance_accumulate(out, torch.zeros(5, 3), torch.ones(4))
    with pytest.raises(ValueError, match="overlapping memory"):
        ops.covariance_accumulate(torch.zeros(1, 3).expand(3, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="must not share memory with x"):
        buf = torch.zeros(3, 3)
        ops.covariance_accumulate(buf, buf)
    with pytest.raises(ValueError, match="out requires grad"):
        ops.covariance_accumulate(torch.zeros(3, 3, requires_grad=True), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="x must be a tensor"):
        ops.covariance_accumulate(out, [[1.0]])
    g, a = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    q_s, q_a = torch.eye(4), torch.eye(6)
    with pytest.raises(ValueError, match=r"q_a must have shape \[6, 6\]"):
        ops.eigen_correction_accumulate(torch.zeros(4, 6), g, a, q_s, torch.eye(5), None, True)
    with pytest.raises(ValueError, match=r"out must have shape \[4, 6\]"):
        ops.eigen_correction_accumulate(torch.zeros(4, 5), g, a, q_s, q_a, None, True)
    with pytest.raises(ValueError, match=r"a and g must have the same samples and tokens"):
        ops.eigen_correction_accumulate(torch.zeros(4, 6), g, torch.zeros(2, 2, 5), q_s, q_a, None, True)
    with pytest.raises(ValueError, match=r"weights must have shape \[2, 3\]"):
        ops.eigen_correction_accumulate(torch.zeros(4, 6), g, a, q_s, q_a, torch.ones(3, 2), True)
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        ops.eigen_correction_accumulate(torch.zeros(4, 6), g, a, q_s, q_a, None, True, -1)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_opcheck(device, dtype):
    x = torch.randn(7, 3, dtype=dtype, device=device)
    out = torch.zeros(4, 4, dtype=dtype, device=device)
    w = torch.rand(7, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.twicediff.kfac_covariance_.default, (out, x, w, True))
    torch.library.opcheck(torch.ops.twicediff.kfac_covariance_.default,
                          (torch.zeros(3, 3, dtype=dtype, device=device), x, None, False))
    g = torch.randn(3, 2, 4, dtype=dtype, device=device)
    a = torch.randn(3, 2, 3, dtype=dtype, device=device)
    q_s = torch.linalg.qr(torch.randn(4, 4, dtype=dtype, device=device))[0]
    q_a = torch.linalg.qr(torch.randn(4, 4, dtype=dtype, device=device))[0]
    torch.library.opcheck(torch.ops.twicediff.kfac_eigen_correction_.default,
                          (torch.zeros(4, 4, dtype=dtype, device=device), g, a, q_s, q_a, None, True, 0))
    torch.library.opcheck(torch.ops.twicediff.kfac_eigen_correction_.default,
                          (torch.zeros(4, 4, dtype=dtype, device=device), g, a, q_s, q_a,
                           torch.ones(3, 2, dtype=dtype, device=device), True, 1))


# ---- property-based fuzzing (hypothesis, derandomized) -------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _maybe_strided(t, strided):
    if not strided or t.dim() == 0 or t.shape[-1] == 0:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@FUZZ
@given(R=st.integers(0, 9), d=st.integers(0, 6), bias=st.booleans(), mask=st.sampled_from([None, "float", "bool", "zero"]),
       in_dtype=st.sampled_from(IN_DTYPES), out_dtype=st.sampled_from(OUT_DTYPES), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_covariance(R, d, bias, mask, in_dtype, out_dtype, strided, seed):
    x = _maybe_strided(torch.randn(R, d, generator=_gen(seed), dtype=torch.float64).to(in_dtype), strided)
    w = _weights(mask, (R,), "cpu", seed + 1)
    D = d + bias
    start = torch.randn(D, D, generator=_gen(seed + 2), dtype=torch.float64).to(out_dtype)
    want = ref.kfac_covariance_(start.clone().double(), x, w, bias)
    got = ops.covariance_accumulate(start.clone(), x, w, bias)
    torch.testing.assert_close(got.double(), want, **_tol(out_dtype, max(R, 1) * 8))


@FUZZ
@given(N=st.integers(0, 6), T=st.integers(0, 5), O=st.integers(1, 5), I=st.integers(0, 5), bias=st.booleans(),
       mask=st.sampled_from([None, "float", "bool", "zero"]), chunk=st.integers(0, 4),
       dtypes=st.sampled_from([(torch.float64, torch.float64), (torch.float32, torch.float32),
                               (torch.float16, torch.float32), (torch.bfloat16, torch.float64)]),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_eigen_correction(N, T, O, I, bias, mask, chunk, dtypes, strided, seed):
    in_dtype, out_dtype = dtypes
    Ip = I + bias
    g = _maybe_strided(torch.randn(N, T, O, generator=_gen(seed), dtype=torch.float64).to(in_dtype), strided)
    a = _maybe_strided(torch.randn(N, T, I, generator=_gen(seed + 1), dtype=torch.float64).to(in_dtype), strided)
    q_s, q_a = _orthogonal(O, "cpu", seed + 2), _orthogonal(Ip, "cpu", seed + 3)
    w = _weights(mask, (N, T), "cpu", seed + 4)
    start = torch.rand(O, Ip, generator=_gen(seed + 5), dtype=torch.float64).to(out_dtype)
    want = ref.kfac_eigen_correction_(start.clone().double(), g, a, q_s, q_a, w, bias)
    got = ops.eigen_correction_accumulate(start.clone(), g, a, q_s, q_a, w, bias, chunk)
    torch.testing.assert_close(got.double(), want, **_tol(out_dtype, max(N * T * T, 1) * 8))
