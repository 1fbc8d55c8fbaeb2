"""The parameter-space ops (pack_into, unpack_into, pack, blockwise_contract, blockwise_dot) against
their pure-torch references in twicediff._reference, per device, on awkward shapes; opcheck on every
op; gradcheck / gradgradcheck in float64 for the differentiable ones; the errors for bad input."""
import re

import pytest
import torch

from twicediff import ops as _ops
from twicediff.ops import reference as ref

# Parameter shapes (without the leading row dimension) of the cases every op is run on.
SHAPES = {
    "mlp": [(5, 3), (5,), (2, 5), (2,)],
    "one_block": [(7,)],
    "zero_sized_blocks": [(0,), (3, 2), (4, 0), (1,), (0, 5)],
    "conv_like": [(4, 3, 3, 3), (4,), (2, 4 * 9), (2,)],
    "many_blocks": [((k * 7) % 5 + 1,) if k % 3 else (2, (k % 4) + 1) for k in range(300)],
}
ROWS = [0, 1, 3]


def make_block(rows, shape, dtype, device, contiguous, gen):
    """A random [rows, *shape] tensor; with contiguous=False a strided view of a larger one."""
    full = (rows, *shape)
    if contiguous:
        return torch.randn(full, dtype=dtype, generator=gen).to(device)
    # every other element of a doubled last dimension, then a transposed pair of dims when possible
    big = torch.randn((*full[:-1], 2 * full[-1]) if full[-1] else full, dtype=dtype, generator=gen).to(device)
    view = big[..., ::2] if full[-1] else big
    if view.dim() >= 2:
        view = view.transpose(0, 1).contiguous().transpose(0, 1)
    assert view.shape == full
    return view


def make_blocks(rows, shapes, dtype, device, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # mixed contiguity when not contiguous: every other block is a strided view
    return [make_block(rows, s, dtype, device, contiguous or k % 2 == 1, gen) for k, s in enumerate(shapes)]


def width(shapes):
    return sum(torch.Size(s).numel() for s in shapes)


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---- pack_into / unpack_into / pack ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_pack_into_and_unpack_into_match_reference(device, case, rows, contiguous):
    shapes = SHAPES[case]
    blocks = make_blocks(rows, shapes, torch.float64, device, contiguous)
    out = torch.full((rows + 3, width(shapes)), float("nan"), dtype=torch.float64, device=device)
    expected = ref.pack_into(blocks, out.clone(), 2)
    assert _ops.pack_into(blocks, out, 2) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)

    outs = [torch.full_like(b, float("nan")) for b in blocks]
    if not contiguous:  # strided destinations too
        outs = [o.transpose(0, 1).contiguous().transpose(0, 1) if o.dim() >= 2 else o for o in outs]
    _ops.unpack_into(out[2:2 + rows], outs)
    for o, b in zip(outs, blocks):
        torch.testing.assert_close(o, b, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_pack_into_strided_matrix(device, layout):
    """A matrix with a row stride larger than P (a column slice) or a non-unit column stride."""
    shapes = SHAPES["mlp"]
    blocks = make_blocks(4, shapes, torch.float32, device)
    p = width(shapes)
    if layout == "column_slice":
        out = torch.zeros(6, p + 5, device=device)[:, 3:3 + p]
    else:
        out = torch.zeros(p, 6, device=device).T
    expected = ref.pack_into(blocks, out.clone(), 1)
    _ops.pack_into(blocks, out, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    outs = [torch.empty_like(b) for b in blocks]
    _ops.unpack_into(out[1:5], outs)
    for o, b in zip(outs, blocks):
        torch.testing.assert_close(o, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_pack_matches_reference(device, case, rows, contiguous):
    blocks = make_blocks(rows, SHAPES[case], torch.float64, device, contiguous)
    got = _ops.pack(blocks)
    assert got.shape == (rows, width(SHAPES[case])) and got.is_contiguous()
    torch.testing.assert_close(got, ref.pack(blocks), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("offset", [0, 1])
def test_pack_copies_any_dtype(device, dtype, offset):
    """Packing moves raw elements: every element width. With offset 0 the last block's rows are
    16-byte aligned (the CUDA kernel copies them as 16-byte vectors) and the others are not; with
    offset 1 nothing is aligned (element copies throughout)."""
    shapes = [(3,), (8,), (1, 5), (16,)]
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, 100, (5, *s), generator=gen).to(dtype).to(device) for s in shapes]
    base = torch.zeros(5 * width(shapes) + offset, dtype=dtype, device=device)
    out = base[offset:].view(5, width(shapes))  # misaligned start
    _ops.pack_into(blocks, out, 0)
    assert torch.equal(out, ref.pack(blocks))
    assert torch.equal(_ops.pack(blocks), ref.pack(blocks))
    outs = [torch.zeros_like(b) for b in blocks]
    _ops.unpack_into(out, outs)
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))


@pytest.mark.parametrize("rows", [1, 9])
def test_pack_large_rows_are_split_evenly(device, rows):
    """One row much longer than the others and many rows: every element lands once."""
    shapes = [(70001,), (3,), (1, 1), (2049,)]
    blocks = make_blocks(rows, shapes, torch.float32, device)
    torch.testing.assert_close(_ops.pack(blocks), ref.pack(blocks), rtol=0, atol=0)
    outs = [torch.empty_like(b) for b in blocks]
    _ops.unpack_into(ref.pack(blocks), outs)
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))


# ---- blockwise_contract / blockwise_dot ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("rows", [(0, 2), (1, 1), (3, 4)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_blockwise_contract_matches_reference(device, dtype, case, rows, contiguous):
    a = make_blocks(rows[0], SHAPES[case], dtype, device, contiguous, seed=1)
    b = make_blocks(rows[1], SHAPES[case], dtype, device, contiguous, seed=2)
    got = _ops.blockwise_contract(a, b)
    expected = ref.blockwise_contract([x.double() for x in a], [x.double() for x in b])
    assert got.shape == rows and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("rows", [0, 1, 5])
@pytest.mark.parametrize("contiguous", [True, False])
def test_blockwise_dot_matches_reference(device, dtype, case, rows, contiguous):
    v = make_blocks(rows, SHAPES[case], dtype, device, contiguous, seed=3)
    g = [x[0] for x in make_blocks(1, SHAPES[case], dtype, device, contiguous, seed=4)]
    got = _ops.blockwise_dot(v, g)
    expected = ref.blockwise_dot([x.double() for x in v], [x.double() for x in g])
    assert got.shape == (rows,) and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blockwise_half_precision_on_cuda(device, dtype):
    if device.type != "cuda":
        pytest.skip("float16 / bfloat16 blockwise ops are CUDA-only")
    a = make_blocks(3, SHAPES["mlp"], dtype, device, seed=1)
    b = make_blocks(4, SHAPES["mlp"], dtype, device, seed=2)
    got = _ops.blockwise_contract(a, b)
    torch.testing.assert_close(got.double(), ref.blockwise_contract([x.double() for x in a], [x.double() for x in b]),
                               rtol=3e-2, atol=3e-2)
    g = [x[0] for x in b]
    torch.testing.assert_close(_ops.blockwise_dot(a, g).double(),
                               ref.blockwise_dot([x.double() for x in a], [x.double() for x in g]),
                               rtol=3e-2, atol=3e-2)


# ---- opcheck, gradcheck -------------------------------------------------------------------------------


def _grad_inputs(shapes, rows, device, seed):
    return [b.requires_grad_(True) for b in make_blocks(rows, shapes, torch.float64, device, seed=seed)]


@pytest.mark.parametrize("case", ["mlp", "zero_sized_blocks"])
def test_opcheck(device, case):
    shapes = SHAPES[case]
    ops = torch.ops.twicediff
    blocks = make_blocks(3, shapes, torch.float64, device)
    torch.library.opcheck(ops.pack_into, (blocks, torch.zeros(5, width(shapes), dtype=torch.float64, device=device), 1))
    torch.library.opcheck(ops.unpack_into, (ref.pack(blocks), [torch.empty_like(b) for b in blocks]))
    for requires_grad in (False, True) if case == "mlp" else (False,):
        a = [b.detach().requires_grad_(requires_grad) for b in blocks]
        b = [x.detach().requires_grad_(requires_grad) for x in make_blocks(2, shapes, torch.float64, device, seed=5)]
        torch.library.opcheck(ops.pack, (a,))
        torch.library.opcheck(ops.blockwise_contract, (a, b))
        torch.library.opcheck(ops.blockwise_dot, (a, [x[0].detach().requires_grad_(requires_grad) for x in b]))


def test_gradcheck_pack(device):
    blocks = _grad_inputs(SHAPES["zero_sized_blocks"] + [(2, 2)], 3, device, seed=6)
    fn = lambda *x: _ops.pack(list(x))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(blocks))
    assert torch.autograd.gradgradcheck(fn, tuple(blocks))


def test_gradcheck_blockwise_contract(device):
    shapes = [(2, 3), (0,), (4,)]
    a = _grad_inputs(shapes, 3, device, seed=7)
    b = _grad_inputs(shapes, 2, device, seed=8)
    fn = lambda *x: _ops.blockwise_contract(list(x[:3]), list(x[3:]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*a, *b))
    assert torch.autograd.gradgradcheck(fn, (*a, *b))


def test_gradcheck_blockwise_dot(device):
    shapes = [(2, 3), (0,), (4,)]
    v = _grad_inputs(shapes, 3, device, seed=9)
    g = [x[0].detach().requires_grad_(True) for x in _grad_inputs(shapes, 1, device, seed=10)]
    fn = lambda *x: _ops.blockwise_dot(list(x[:3]), list(x[3:]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*v, *g))
    assert torch.autograd.gradgradcheck(fn, (*v, *g))


def test_blockwise_dot_gives_hessian_vector_products(device):
    """The mvp use: z = blockwise_dot(V, grad(loss)) differentiated again gives H V^T."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double().to(device)
    x, y = torch.randn(6, 3, dtype=torch.float64, device=device), torch.randn(6, 2, dtype=torch.float64, device=device)
    params = list(model.parameters())
    directions = [torch.randn(5, *p.shape, dtype=torch.float64, device=device) for p in params]
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), params, create_graph=True)
    z = _ops.blockwise_dot(directions, list(grads))
    hvps = [torch.autograd.grad(z[d], params, retain_graph=True) for d in range(5)]
    got = torch.stack([torch.cat([h.reshape(-1) for h in hv]) for hv in hvps])

    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(theta):
        chunks = torch.split(theta, [p.numel() for p in params])
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, {n: c.reshape(p.shape) for n, c, p in zip(names, chunks, params)}, (x,))
        return torch.nn.functional.mse_loss(out, y)

    hessian = torch.func.hessian(loss_of)(flat)
    expected = ref.pack(directions) @ hessian
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---- bad input -------------------------------------------------------------------------------------------


def _bad_calls(device):
    f32, f64 = torch.float32, torch.float64
    z = lambda *s, dtype=f32, device=device: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    other = torch.device("meta")
    return [
        # (call, exception type, words the message must contain)
        (lambda: _ops.pack_into(z(2, 3), z(2, 3)), TypeError, ["blocks", "list"]),
        (lambda: _ops.pack_into([z(2, 3), 5], z(2, 3)), TypeError, ["blocks[1]", "int"]),
        (lambda: _ops.pack_into([z(2, 3)], "out"), TypeError, ["out", "str"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 3), 0.5), TypeError, ["row_offset", "float"]),
        (lambda: _ops.pack_into([], z(2, 3)), ValueError, ["blocks", "empty"]),
        (lambda: _ops.pack_into([z(2, 3)], z(6)), ValueError, ["out", "2-d", "[6]"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 4)), ValueError, ["out", "P = 4", "3"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 3), 1), ValueError, ["rows [1, 3)", "N = 2"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 3), -1), ValueError, ["row_offset", "-1"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 3, dtype=f64)), TypeError, ["out", "Double", "Float"]),
        (lambda: _ops.pack_into([z(2, 3), z(2, 1, dtype=f64)], z(2, 4)), TypeError, ["blocks[1]", "Double"]),
        (lambda: _ops.pack_into([z(2, 3), z(3, 1)], z(2, 4)), ValueError, ["blocks[1]", "[3, 1]", "B = 2"]),
        (lambda: _ops.pack_into([z(())], z(1, 1)), ValueError, ["blocks[0]", "0-d"]),
        (lambda: _ops.pack_into([z(2, 3)], z(1, 3).expand(2, 3)), ValueError, ["out", "overlapping"]),
        (lambda: (lambda m: _ops.pack_into([m[:, :1]], m[:, 1:2]))(z(2, 3)), ValueError, ["blocks[0]", "shares memory"]),
        (lambda: _ops.pack_into([z(2, 3, device=other)], z(2, 3)), ValueError, ["meta", "device"]),
        (lambda: _ops.unpack_into(z(2, 3), [z(1, 3)]), ValueError, ["outs", "B = 1", "rows"]),
        (lambda: _ops.unpack_into(z(2, 3), [z(2, 4)]), ValueError, ["rows", "P = 3"]),
        (lambda: _ops.unpack_into(z(2, 3), [z(1, 3).expand(2, 3)]), ValueError, ["outs[0]", "overlapping"]),
        (lambda: _ops.unpack_into([z(2, 3)], [z(2, 3)]), TypeError, ["rows", "list"]),
        (lambda: _ops.pack_into([z(2, 3)], z(2, 3).requires_grad_()), ValueError, ["out", "requires grad"]),
        (lambda: _ops.unpack_into(z(2, 3), [z(2, 3).requires_grad_()]), ValueError, ["outs[0]", "requires grad"]),
        (lambda: _ops.pack(z(2, 3)), TypeError, ["blocks", "Tensor"]),
        (lambda: _ops.pack([z(2, 3), z(4, 3)]), ValueError, ["blocks[1]", "B = 2"]),
        (lambda: _ops.pack([z(2, 3), z(2, 3, device=other)]), ValueError, ["blocks[1]", "meta", "device"]),
        (lambda: _ops.blockwise_contract([z(2, 3)], z(2, 3)), TypeError, ["b", "Tensor"]),
        (lambda: _ops.blockwise_contract([z(2, 3)], [z(2, 3), z(2, 1)]), ValueError, ["a", "b", "1", "2"]),
        (lambda: _ops.blockwise_contract([z(2, 3)], [z(4, 2)]), ValueError, ["a[0]", "b[0]", "[2, 3]", "[4, 2]"]),
        (lambda: _ops.blockwise_contract([z(2, 3), z(3, 1)], [z(2, 3), z(2, 1)]), ValueError, ["a[1]", "[3, 1]"]),
        (lambda: _ops.blockwise_contract([z(2, 3)], [z(2, 3, dtype=f64)]), TypeError, ["b[0]", "Double", "Float"]),
        (lambda: _ops.blockwise_contract([z(2, 3, dtype=torch.int64)], [z(2, 3)]), TypeError, ["a[0]", "float32", "Long"]),
        (lambda: _ops.blockwise_contract([], []), ValueError, ["a", "empty"]),
        (lambda: _ops.blockwise_dot([z(2, 3)], []), ValueError, ["g", "empty"]),
        (lambda: _ops.pack([]), ValueError, ["blocks", "empty"]),
        (lambda: _ops.blockwise_contract([z(2, 3)], [z(2, 3, device=other)]), ValueError, ["b[0]", "meta", "device"]),
        (lambda: _ops.blockwise_dot([z(2, 3)], [z(2, 3)]), ValueError, ["g[0]", "[3]", "[2, 3]"]),
        (lambda: _ops.blockwise_dot([z(2, 3)], [z(3), z(1)]), ValueError, ["v", "g", "1", "2"]),
        (lambda: _ops.blockwise_dot([z(2, 3), z(4, 1)], [z(3), z(1)]), ValueError, ["v[1]", "[4, 1]"]),
        (lambda: _ops.blockwise_dot([z(2, 3)], [z(3, dtype=f64)]), TypeError, ["g[0]", "Double"]),
        (lambda: _ops.blockwise_dot([z(2, 3, dtype=torch.float16)], [z(3, dtype=torch.float16)]) if device.type == "cpu"
         else _ops.blockwise_dot([z(2, 3, dtype=torch.int32)], [z(3, dtype=torch.int32)]), TypeError, ["v[0]", "float32"]),
        (lambda: _ops.blockwise_dot([z(())], [z(())]), ValueError, ["v[0]", "0-d"]),
        (lambda: _ops.blockwise_dot(5, [z(3)]), TypeError, ["v", "int"]),
    ]


def test_bad_input_raises_clear_errors(device):
    for i, (call, exc, words) in enumerate(_bad_calls(device)):
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value), f"case {i}: {w!r} not in {str(info.value)!r}"


def test_meta_tensors_go_through_the_fake_kernels():
    """All-meta inputs give meta outputs of the right shape; mixed meta and CPU a device error."""
    meta = torch.device("meta")
    shapes = SHAPES["mlp"]
    blocks = [torch.empty(3, *s, device=meta) for s in shapes]
    assert _ops.pack(blocks).shape == (3, width(shapes))
    assert _ops.blockwise_contract(blocks, [torch.empty(2, *s, device=meta) for s in shapes]).shape == (3, 2)
    assert _ops.blockwise_dot(blocks, [torch.empty(s, device=meta) for s in shapes]).shape == (3,)
    _ops.pack_into(blocks, torch.empty(4, width(shapes), device=meta), 1)
    _ops.unpack_into(torch.empty(3, width(shapes), device=meta), blocks)
    cpu_blocks = [torch.zeros(3, *s) for s in shapes]
    with pytest.raises(ValueError, match=re.escape("blocks[0] is on cpu but out is on meta")):
        _ops.pack_into(cpu_blocks, torch.empty(3, width(shapes), device=meta))
    with pytest.raises(ValueError, match="device"):
        _ops.blockwise_dot(cpu_blocks, [torch.empty(s, device=meta) for s in shapes])


def test_in_place_ops_copy_values_of_tensors_in_a_graph(device):
    """pack_into / unpack_into read tensors that require grad as values (no graph is recorded)."""
    blocks = _grad_inputs(SHAPES["mlp"], 2, device, seed=11)
    out = _ops.pack_into(blocks, torch.empty(2, width(SHAPES["mlp"]), dtype=torch.float64, device=device))
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.pack(blocks).detach(), rtol=0, atol=0)
    outs = _ops.unpack_into(ref.pack(blocks), [torch.empty_like(b, requires_grad=False) for b in blocks])
    assert all(torch.equal(o, b.detach()) and not o.requires_grad for o, b in zip(outs, blocks))
