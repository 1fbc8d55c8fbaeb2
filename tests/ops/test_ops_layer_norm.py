"""The LayerNorm tangent ops (layer_norm_tangent, layer_norm_backward_tangent) against their
pure-torch reference and against torch's own derivatives of F.layer_norm, in float64 on awkward
shapes, every combination of absent tangents, no weight, non-contiguous inputs; their batching
rules (vmap over directions, and over a batched primal: one call per slice); opcheck; errors that name the argument."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from twicediff.ops import layer_norm as ops
from twicediff.ops import reference as ref

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 33, 32), (4, 3, 65), (2, 0, 4), (0, 3, 4)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _t(shape, dtype, device, seed, contiguous=True):
    if contiguous or len(shape) < 2:
        return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(device=device, dtype=dtype)
    wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=_gen(seed), dtype=torch.float64)
    return wide[..., ::2].to(device=device, dtype=dtype)


def _rows(R, d, dtype, device, seed):
    """(x, xhat, rstd) of a layer_norm over rows that are not centred or of unit scale."""
    x = _t((R, d), torch.float64, "cpu", seed) * 3 + 1.5
    xhat, _, rstd = torch.native_layer_norm(x, (d,), None, None, 1e-5)
    return (x.to(device=device, dtype=dtype), xhat.to(device=device, dtype=dtype),
            rstd.reshape(R).to(device=device, dtype=dtype))


def _truth_tangent(x, weight, x_t, weight_t, bias_t):
    """jvp of F.layer_norm itself, direction by direction."""
    d = x.shape[-1]
    w = weight if weight is not None else torch.ones(d, dtype=x.dtype, device=x.device)
    b = torch.zeros(d, dtype=x.dtype, device=x.device)
    B = next(t.shape[0] for t in (x_t, weight_t, bias_t) if t is not None)
    out = []
    for k in range(B):
        tangents = tuple(torch.zeros_like(p) if t is None else t[k] for p, t in ((x, x_t), (w, weight_t), (b, bias_t)))
        out.append(torch.func.jvp(lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-5), (x, w, b), tangents)[1])
    return torch.stack(out) if out else torch.zeros(0, *x.shape, dtype=x.dtype, device=x.device)


def _truth_backward_tangent(x, weight, grad_out, grad_out_t, x_t, weight_t):
    d = x.shape[-1]
    w = weight if weight is not None else torch.ones(d, dtype=x.dtype, device=x.device)
    b = torch.zeros(d, dtype=x.dtype, device=x.device)

    def backward(gy, x, w):
        return torch.func.vjp(lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-5), x, w, b)[1](gy)
    B = next(t.shape[0] for t in (grad_out_t, x_t, weight_t) if t is not None)
    outs = []
    for k in range(B):
        tangents = tuple(torch.zeros_like(p) if t is None else t[k]
                         for p, t in ((grad_out, grad_out_t), (x, x_t), (w, weight_t)))
        outs.append(torch.func.jvp(backward, (grad_out, x, w), tangents)[1])
    return tuple(torch.stack([o[i] for o in outs]) for i in range(3))


def _maybe(flag, make):
    return make() if flag else None


@pytest.mark.parametrize("B, R, d", SHAPES)
@pytest.mark.parametrize("has_x, has_w, has_wt, has_bt", [c for c in itertools.product([True, False], repeat=4)
                                                           if c[0] or c[2] or c[3]])
def test_tangent_matches_reference_and_torch(device, B, R, d, has_x, has_w, has_wt, has_bt):
    x, xhat, rstd = _rows(R, d, torch.float64, device, 1)
    weight = _maybe(has_w, lambda: _t((d,), torch.float64, device, 2))
    x_t = _maybe(has_x, lambda: _t((B, R, d), torch.float64, device, 3, contiguous=False))
    weight_t = _maybe(has_wt, lambda: _t((B, d), torch.float64, device, 4, contiguous=False))
    bias_t = _maybe(has_bt, lambda: _t((B, d), torch.float64, device, 5))
    got = ops.layer_norm_tangent(x_t, xhat, rstd, weight, weight_t, bias_t)
    assert got.shape == (B, R, d)
    torch.testing.assert_close(got, ref.layer_norm_tangent(x_t, xhat, rstd, weight, weight_t, bias_t),
                               rtol=1e-10, atol=1e-12)
    if B and R:
        torch.testing.assert_close(got, _truth_tangent(x, weight, x_t, weight_t, bias_t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B, R, d", SHAPES)
@pytest.mark.parametrize("has_gyt, has_x, has_w, has_wt", [c for c in itertools.product([True, False], repeat=4)
                                                            if c[0] or c[1] or c[3]])
def test_backward_tangent_matches_reference_and_torch(device, B, R, d, has_gyt, has_x, has_w, has_wt):
    x, xhat, rstd = _rows(R, d, torch.float64, device, 11)
    grad_out = _t((R, d), torch.float64, device, 12, contiguous=False)
    weight = _maybe(has_w, lambda: _t((d,), torch.float64, device, 13))
    grad_out_t = _maybe(has_gyt, lambda: _t((B, R, d), torch.float64, device, 14))
    x_t = _maybe(has_x, lambda: _t((B, R, d), torch.float64, device, 15, contiguous=False))
    weight_t = _maybe(has_wt, lambda: _t((B, d), torch.float64, device, 16))
    got = ops.layer_norm_backward_tangent(grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t)
    assert [tuple(t.shape) for t in got] == [(B, R, d), (B, d), (B, d)]
    want = ref.layer_norm_backward_tangent(grad_out, grad_out_t, x_t, xhat, rstd, weight, weight_t)
    for name, g, w in zip(("grad_x_t", "grad_weight_t", "grad_bias_t"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")
    if B and R:
        truth = _truth_backward_tangent(x, weight, grad_out, grad_out_t, x_t, weight_t)
        for name, g, w in zip(("grad_x_t", "grad_weight_t", "grad_bias_t"), got, truth):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_float32_is_close_to_float64(device):
    x, xhat, rstd = _rows(64, 48, torch.float64, device, 21)
    gy, w = _t((64, 48), torch.float64, device, 22), _t((48,), torch.float64, device, 23)
    xt, gyt, wt = _t((5, 64, 48), torch.float64, device, 24), _t((5, 64, 48), torch.float64, device, 25), \
        _t((5, 48), torch.float64, device, 26)
    f32 = [t.float() for t in (gy, gyt, xt, xhat, rstd, w, wt)]
    for got, want in zip(ops.layer_norm_backward_tangent(*f32), ops.layer_norm_backward_tangent(gy, gyt, xt, xhat, rstd, w, wt)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    got = ops.layer_norm_tangent(xt.float(), xhat.float(), rstd.float(), w.float(), wt.float(), None)
    torch.testing.assert_close(got.double(), ops.layer_norm_tangent(xt, xhat, rstd, w, wt, None), rtol=1e-4, atol=1e-4)


def test_results_do_not_depend_on_the_threads():
    x, xhat, rstd = _rows(700, 24, torch.float32, "cpu", 31)
    args = (_t((700, 24), torch.float32, "cpu", 32), _t((3, 700, 24), torch.float32, "cpu", 33),
            _t((3, 700, 24), torch.float32, "cpu", 34), xhat, rstd, _t((24,), torch.float32, "cpu", 35),
            _t((3, 24), torch.float32, "cpu", 36))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.layer_norm_backward_tangent(*args)
        torch.set_num_threads(max(2, threads))
        many = ops.layer_norm_backward_tangent(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_vmap_folds_directions_and_batches_primals(device):
    """vmap over a further direction dimension (the func engine's) gives the op on each slice; vmap
    over the rows themselves (a batched primal) calls the op per slice."""
    x, xhat, rstd = _rows(6, 5, torch.float64, device, 41)
    gy, w = _t((6, 5), torch.float64, device, 42), _t((5,), torch.float64, device, 43)
    xt, gyt, wt = _t((4, 2, 6, 5), torch.float64, device, 44), _t((4, 2, 6, 5), torch.float64, device, 45), \
        _t((4, 2, 5), torch.float64, device, 46)
    got = torch.vmap(lambda a, b: ops.layer_norm_tangent(a, xhat, rstd, w, b, None))(xt, wt)
    want = torch.stack([ops.layer_norm_tangent(xt[k], xhat, rstd, w, wt[k], None) for k in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # one tangent batched by this vmap level, another not (it is expanded)
    got = torch.vmap(lambda a: ops.layer_norm_backward_tangent(gy, a, xt[0], xhat, rstd, w, None), in_dims=1)(
        gyt.movedim(0, 1))
    for k in range(4):
        for g, want in zip(got, ops.layer_norm_backward_tangent(gy, gyt[k], xt[0], xhat, rstd, w, None)):
            torch.testing.assert_close(g[k], want, rtol=1e-12, atol=1e-12)
    # batched primal rows: three layer_norms of different rows
    xs = torch.stack([_rows(6, 5, torch.float64, device, 50 + k)[1] for k in range(3)])
    rs = torch.stack([_rows(6, 5, torch.float64, device, 50 + k)[2] for k in range(3)])
    got = torch.vmap(lambda h, r, a: ops.layer_norm_backward_tangent(gy, None, a, h, r, w, None))(xs, rs, xt[:3])
    for k in range(3):
        for g, want in zip(got, ops.layer_norm_backward_tangent(gy, None, xt[k], xs[k], rs[k], w, None)):
            torch.testing.assert_close(g[k], want, rtol=1e-10, atol=1e-12)


def test_opcheck(device):
    _, xhat, rstd = _rows(5, 4, torch.float32, device, 61)
    gy, w = _t((5, 4), torch.float32, device, 62), _t((4,), torch.float32, device, 63)
    xt, wt = _t((2, 5, 4), torch.float32, device, 64), _t((2, 4), torch.float32, device, 65)
    torch.library.opcheck(torch.ops.twicediff.layer_norm_tangent.default, (xt, xhat, rstd, w, wt, None))
    torch.library.opcheck(torch.ops.twicediff.layer_norm_backward_tangent.default, (gy, xt, None, xhat, rstd, w, wt))


@pytest.mark.parametrize("bad, error, words", [
    ("no tangent", ValueError, "at least one tangent"),
    ("x_t shape", ValueError, "x_t must have shape [2, 5, 4]"),
    ("weight shape", ValueError, "weight must have shape [4]"),
    ("rstd shape", ValueError, "rstd must have shape [5]"),
    ("dtype", TypeError, "weight_t must have xhat's dtype"),
    ("xhat dims", ValueError, "xhat must be [rows, features]"),
    ("xhat int", TypeError, "xhat must be float32 or float64"),
    ("not a tensor", TypeError, "bias_t must be a tensor or None"),
])
def test_bad_arguments_are_named(bad, error, words):
    _, xhat, rstd = _rows(5, 4, torch.float32, "cpu", 71)
    args = dict(x_t=_t((2, 5, 4), torch.float32, "cpu", 72), xhat=xhat, rstd=rstd,
                weight=_t((4,), torch.float32, "cpu", 73), weight_t=_t((2, 4), torch.float32, "cpu", 74), bias_t=None)
    if bad == "no tangent":
        args.update(x_t=None, weight_t=None)
    elif bad == "x_t shape":
        args["weight_t"] = _t((2, 4), torch.float32, "cpu", 74)
        args["x_t"] = _t((2, 5, 3), torch.float32, "cpu", 72)
    elif bad == "weight shape":
        args["weight"] = torch.ones(5)
    elif bad == "rstd shape":
        args["rstd"] = torch.ones(4)
    elif bad == "dtype":
        args["weight_t"] = args["weight_t"].double()
    elif bad == "xhat dims":
        args["xhat"] = xhat.unsqueeze(0)
    elif bad == "xhat int":
        args["xhat"] = torch.ones(5, 4, dtype=torch.int64)
    else:
        args["bias_t"] = [1.0, 2.0]
    with pytest.raises(error) as info:
        ops.layer_norm_tangent(**args)
    assert words in str(info.value)
