"""Property-based fuzzing of every parameter-space and solver-step op against its pure-torch
reference (hypothesis, derandomized so CI is reproducible): random shapes including empty blocks and
long parameter lists, non-contiguous views, dtype mixes and wrong devices (the meta device stands in
for a second device without a GPU). Valid inputs must match the reference; invalid ones may only
raise TypeError or ValueError."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twicediff import ops as _ops
from twicediff.ops import reference as _reference

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64]


def _shapes(max_blocks):
    block = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    return st.lists(block, min_size=1, max_size=max_blocks)


def _tensor(shape, dtype, strided, seed):
    g = torch.Generator().manual_seed(seed)
    if strided and len(shape) >= 1:
        # A non-contiguous view with the same values layout: every other element of a wider tensor.
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=torch.float64).to(dtype)
        return wide[..., ::2]
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


@FUZZ
@given(shapes=_shapes(12), rows=st.integers(0, 5), extra_rows=st.integers(0, 3), dtype=st.sampled_from(DTYPES),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_unpack_match_reference(shapes, rows, extra_rows, dtype, strided, seed):
    blocks = [_tensor((rows, *s), dtype, strided, seed + k) for k, s in enumerate(shapes)]
    P = sum(torch.Size(s).numel() for s in shapes)
    offset = extra_rows // 2
    out = torch.full((rows + extra_rows, P), -7.0, dtype=dtype)
    ref = out.clone()
    _ops.pack_into(blocks, out, offset)
    _reference.pack_into(blocks, ref, offset)
    assert torch.equal(out, ref)
    assert torch.equal(_ops.pack(blocks), _reference.pack_into(blocks, torch.empty(rows, P, dtype=dtype)))
    outs = [torch.full((rows, *s), 3.0, dtype=dtype) for s in shapes]
    refs = [o.clone() for o in outs]
    _ops.unpack_into(out[offset:offset + rows], outs)
    _reference.unpack_into(out[offset:offset + rows], refs)
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))


@FUZZ
@given(shapes=_shapes(300), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_long_parameter_lists(shapes, rows, seed):
    blocks = [_tensor((rows, *s), torch.float32, False, seed + k) for k, s in enumerate(shapes)]
    P = sum(torch.Size(s).numel() for s in shapes)
    out = torch.empty(rows, P)
    assert torch.equal(_ops.pack_into(blocks, out, 0), _reference.pack_into(blocks, torch.empty(rows, P), 0))


@FUZZ
@given(shapes=_shapes(8), T=st.integers(0, 4), V=st.integers(0, 4), dtype=st.sampled_from(DTYPES),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_blockwise_contract_and_dot_match_reference(shapes, T, V, dtype, strided, seed):
    a = [_tensor((T, *s), dtype, strided, seed + k) for k, s in enumerate(shapes)]
    b = [_tensor((V, *s), dtype, not strided, seed + 100 + k) for k, s in enumerate(shapes)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ops.blockwise_contract(a, b), _reference.blockwise_contract(a, b), **tol)
    g = [_tensor(s, dtype, False, seed + 200 + k) for k, s in enumerate(shapes)]
    torch.testing.assert_close(_ops.blockwise_dot(a, g), _reference.blockwise_dot(a, g), **tol)


@FUZZ
@given(D=st.integers(0, 5), P=st.integers(0, 40), dtype=st.sampled_from(DTYPES), strided=st.booleans(),
       seed=st.integers(0, 2**16), dampen=st.floats(0, 0.5), scale=st.floats(1, 50), lam=st.floats(0, 1))
def test_solver_steps_match_reference(D, P, dtype, strided, seed, dampen, scale, lam):
    x, r, p, Ap, z, h, b, Hh = (_tensor((D, P), dtype, strided and i % 2 == 0, seed + i) for i in range(8))
    alpha, beta = torch.rand(D, dtype=torch.float64), torch.rand(D, dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    x2, r2 = x.clone(), r.clone()
    torch.testing.assert_close(_ops.cg_step(x, r, p, Ap, alpha), _reference.cg_step(x2, r2, p, Ap, alpha), **tol)
    torch.testing.assert_close((x, r), (x2, r2), **tol)
    p2 = p.clone()
    _ops.cg_direction(p, z, beta)
    _reference.cg_direction(p2, z, beta)
    torch.testing.assert_close(p, p2, **tol)
    old, h2 = h.clone(), h.clone()
    max_rel, sum_rel = _ops.lissa_step(h, b, Hh, dampen, scale, lam)
    _reference.lissa_step(h2, b, Hh, dampen, scale, lam)
    torch.testing.assert_close(h, h2, **tol)
    # The per-row statistics |h' - h| / |h'| are ill-conditioned where h' nearly cancels, so they
    # are checked against the kernel's own h' (one rounding of h' apart from the reference's).
    delta = (h.double() - old.double()).abs()
    rel = torch.where(delta == 0, torch.zeros_like(delta), delta / h.double().abs())
    torch.testing.assert_close(max_rel, rel.amax(1) if P else rel.new_zeros(D), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(sum_rel, rel.sum(1), rtol=1e-6, atol=1e-12)


@FUZZ
@given(shapes=_shapes(4).filter(lambda s: all(torch.Size(x).numel() for x in s)), rows=st.integers(1, 3),
       bad=st.sampled_from(["dtype", "device", "width", "rows", "overlap"]))
def test_invalid_inputs_raise_clear_errors(shapes, rows, bad):
    blocks = [torch.randn(rows, *s) for s in shapes]
    P = sum(torch.Size(s).numel() for s in shapes)
    out = torch.empty(rows, P)
    if bad == "dtype":
        blocks[-1] = blocks[-1].double()
    elif bad == "device":
        blocks[-1] = blocks[-1].to("meta")
    elif bad == "width":
        out = torch.empty(rows, P + 1)
    elif bad == "rows":
        out = torch.empty(rows - 1, P)
    else:  # an expanded (self-overlapping) destination; reading from overlapping views is fine
        out = torch.empty(1, P).expand(rows + 1, P)
        blocks = [b.expand(rows + 1, *b.shape[1:]) if b.shape[0] == 1 else torch.cat([b, b[:1]]) for b in blocks]
    with pytest.raises((TypeError, ValueError)):
        _ops.pack_into(blocks, out, 0)
    if bad == "overlap":
        ref = _reference.pack_into(blocks, torch.empty(rows + 1, P), 0)
        assert torch.equal(_ops.pack_into(blocks, torch.empty(rows + 1, P), 0), ref)
        return
    # The blockwise ops get the same mixed list against a clean one (or a shorter list).
    clean = [torch.randn(rows, *s) for s in shapes]
    with pytest.raises((TypeError, ValueError)):
        _ops.blockwise_contract(clean, blocks if bad in ("dtype", "device") else blocks[:-1])
    with pytest.raises((TypeError, ValueError)):
        _ops.blockwise_dot(blocks if bad in ("dtype", "device") else blocks[:-1], [c[0] for c in clean])


_ACTIVATION = st.sampled_from([("relu", 0, 0), ("leaky_relu", 0.2, 0), ("tanh", 0, 0), ("sigmoid", 0, 0),
                               ("gelu", 0, 0), ("gelu_tanh", 0, 0), ("silu", 0, 0), ("softplus", 1.5, 3.0)])


@FUZZ
@given(data=st.data(), layers=st.integers(1, 3), n=st.integers(0, 5), d=st.integers(0, 4),
       loss=st.sampled_from(["mse", "cross_entropy", "bce_with_logits"]), gauss_newton=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_mlp_hvp_matches_reference(data, layers, n, d, loss, gauss_newton, strided, seed):
    from native_helpers import op_case

    widths = data.draw(st.lists(st.integers(1, 5), min_size=layers + 1, max_size=layers + 1))
    biases = data.draw(st.lists(st.booleans(), min_size=layers, max_size=layers))
    chains = data.draw(st.lists(st.lists(_ACTIVATION, max_size=2), min_size=layers, max_size=layers))
    chains[-1] = []  # the output layer gives the logits
    reduction = "sum" if n == 0 else data.draw(st.sampled_from(["mean", "sum"]))
    x, t, ws, bs, v = op_case("cpu", torch.float64, n, d, widths, biases, chains, loss,
                               torch.Generator().manual_seed(seed))
    if strided:  # non-contiguous views holding the same values
        x = torch.cat([x, x], 1)[:, ::2] if x.shape[1] == 1 else x.t().contiguous().t()
        v = v.t().contiguous().t()
        ws = [w.t().contiguous().t() for w in ws]
    got = _ops.mlp_hvp(x, t, ws, bs, v, chains, loss, reduction, gauss_newton)
    want = _reference.mlp_hvp(x, t, ws, bs, v, chains, loss, reduction, gauss_newton)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gauss_newton", [False, True])
def test_mlp_hvp_takes_wide_batches_a_few_directions_per_pass(threads, gauss_newton):
    """On the CPU a part's directions run in R-passes of a few at a time where one direction's
    [N, width] R-quantity is large against the L2 cache (CpuKernels::directions_per_pass): with
    N = 1024 rows of width 640 in float64 (5 MiB, more than twice any L2 of these machines) every
    direction gets an R-pass of its own, and the result is the reference's, on one thread and on two."""
    from native_helpers import op_case

    chains = [[("tanh", 0, 0)], [("softplus", 1.5, 3.0)], []]
    x, t, ws, bs, v = op_case("cpu", torch.float64, 1024, 5, [12, 640, 24, 3], [True, False, True], chains,
                               "cross_entropy", torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _ops.mlp_hvp(x, t, ws, bs, v, chains, "cross_entropy", "mean", gauss_newton)
    finally:
        torch.set_num_threads(before)
    want = _reference.mlp_hvp(x, t, ws, bs, v, chains, "cross_entropy", "mean", gauss_newton)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
