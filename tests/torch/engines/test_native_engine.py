"""The native HVP engine (twicediff.torch.native_engine) and its op (twicediff.ops.mlp_hvp):
exact products against float64 explicit Hessians / Gauss-Newton matrices, the op against its
pure-torch twin, opcheck, declines with reasons, and bad input."""
import functools
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff import ops as _ops
from twicediff.ops.mlp_hvp import LOSSES as LOSS_CODES, encode_activations
from twicediff.ops import reference as _reference
from twicediff._build import _C
from native_helpers import build_native_engine, native_hvp, op_case
from twicediff.errors import NotNativeError

from hessian_reference import explicit_gauss_newton, explicit_hessian

ACTIVATIONS = {
    "none": None,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
}
LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits}
CLASSES = {"mse": 2, "cross_entropy": 3, "bce": 2}


def make_model(activation: str, bias: bool, prefix: bool, classes: int) -> nn.Sequential:
    """[frozen Conv1d + Flatten prefix] -> Linear -> act -> Linear; float64, P small."""
    act = ACTIVATIONS[activation]
    layers = []
    if prefix:
        conv = nn.Conv1d(1, 2, 3)
        conv.requires_grad_(False)
        layers += [conv, nn.Flatten()]
    layers += [nn.Linear(8 if prefix else 4, 5, bias=bias)]
    if act is not None:
        layers.append(act())
    layers.append(nn.Linear(5, classes, bias=bias))
    return nn.Sequential(*layers).double().eval()


def make_batch(loss: str, n: int, prefix: bool, classes: int, gen: torch.Generator):
    x = torch.randn(n, 1, 6, generator=gen, dtype=torch.float64) if prefix else \
        torch.randn(n, 4, generator=gen, dtype=torch.float64)
    # Spread inputs so that ReLU kinks and Softplus's threshold are crossed.
    x = 2 * x
    if loss == "cross_entropy":
        y = torch.randint(0, classes, (n,), generator=gen)
    elif loss == "bce":
        y = torch.rand(n, classes, generator=gen, dtype=torch.float64)
    else:
        y = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    return x, y


def over_native_configs(test):
    """Parametrizes ``test`` over every activation × loss × reduction × bias or none × frozen
    prefix or none (arguments activation, loss, reduction, bias, prefix)."""
    for name, values, ids in [("activation", list(ACTIVATIONS), None), ("loss", list(LOSSES), None),
                              ("reduction", ["mean", "sum"], None), ("bias", [True, False], ["bias", "nobias"]),
                              ("prefix", [False, True], ["plain", "prefix"])]:
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


def native_config(activation, loss, reduction, bias, prefix, salt=""):
    """(model, loss_fn, generator, classes) for one configuration, seeded reproducibly from it."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((salt, activation, loss, reduction, bias, prefix)).encode()))
    classes = CLASSES[loss]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = make_model(activation, bias, prefix, classes)
    return model, functools.partial(LOSSES[loss], reduction=reduction), gen, classes


@over_native_configs
def test_hvp_matches_explicit_hessian(activation, loss, reduction, bias, prefix):
    model, loss_fn, gen, classes = native_config(activation, loss, reduction, bias, prefix)
    engine, reason = build_native_engine(model, loss_fn)
    assert engine is not None, reason
    for n in (1, 6):
        x, y = make_batch(loss, n, prefix, classes, gen)
        H = explicit_hessian(model, loss_fn, x, y)
        P = H.shape[0]
        for d in (1, 7, 64):
            v = torch.randn(d, P, generator=gen, dtype=torch.float64)
            got = native_hvp(engine, x, y, v)
            torch.testing.assert_close(got, v @ H, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_gauss_newton_matches_explicit(activation, loss, reduction):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    classes = CLASSES[loss]
    model = make_model(activation, True, False, classes)
    loss_fn = functools.partial(LOSSES[loss], reduction=reduction)
    engine, reason = build_native_engine(model, loss_fn)
    assert engine is not None, reason
    for n in (1, 6):
        x, y = make_batch(loss, n, False, classes, gen)
        G = explicit_gauss_newton(model, loss_fn, x, y)
        v = torch.randn(7, G.shape[0], generator=gen, dtype=torch.float64)
        torch.testing.assert_close(native_hvp(engine, x, y, v, mode="gauss_newton"), v @ G, rtol=1e-9, atol=1e-11)


def test_deep_chains_nested_passthrough_and_module_losses():
    """Nested Sequentials, Identity / Dropout(eval) / Flatten in the suffix, two activations in a
    row, an activation after the last Linear, C = 1 (squeezed output) and nn loss modules."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Softplus(), nn.Identity()), nn.Dropout(0.5),
        nn.Sequential(nn.Linear(4, 4, bias=False), nn.Flatten(), nn.SiLU()), nn.Linear(4, 1), nn.Sigmoid(),
    ).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    for loss_fn, y in [(nn.MSELoss(), torch.randn(5, generator=gen, dtype=torch.float64)),
                       (nn.MSELoss(reduction="sum"), torch.randn(5, 1, generator=gen, dtype=torch.float64)),
                       (nn.BCEWithLogitsLoss(), torch.rand(5, generator=gen, dtype=torch.float64))]:
        engine, reason = build_native_engine(model, loss_fn)
        assert engine is not None, reason
        v = torch.randn(7, sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
        torch.testing.assert_close(native_hvp(engine, x, y, v), v @ explicit_hessian(model, loss_fn, x, y),
                                   rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(native_hvp(engine, x, y, v, "gauss_newton"),
                                   v @ explicit_gauss_newton(model, loss_fn, x, y), rtol=1e-9, atol=1e-11)
        # N = 1 and C = 1: squeeze makes both the output and the target 0-d
        torch.testing.assert_close(native_hvp(engine, x[:1], y[:1], v), v @ explicit_hessian(model, loss_fn, x[:1], y[:1]),
                                   rtol=1e-9, atol=1e-11)


def test_cross_entropy_module_and_ignored_targets():
    """nn.CrossEntropyLoss(reduction='sum') and rows whose target is the default ignore_index
    (-100), which do not count (also not in the mean's denominator)."""
    torch.manual_seed(0)
    model = make_model("gelu", True, False, 3)
    gen = torch.Generator().manual_seed(2)
    x, y = make_batch("cross_entropy", 6, False, 3, gen)
    y[[1, 4]] = -100
    v = torch.randn(5, sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    for loss_fn in (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(), F.cross_entropy):
        engine, reason = build_native_engine(model, loss_fn)
        assert engine is not None, reason
        torch.testing.assert_close(native_hvp(engine, x, y, v), v @ explicit_hessian(model, loss_fn, x, y),
                                   rtol=1e-9, atol=1e-11)


def test_engine_reads_current_weights_and_single_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    engine, reason = build_native_engine(model, F.cross_entropy)
    assert engine is not None, reason
    gen = torch.Generator().manual_seed(3)
    x, y = make_batch("cross_entropy", 6, False, 3, gen)
    v = torch.randn(3, 15, generator=gen, dtype=torch.float64)
    before = native_hvp(engine, x, y, v)
    with torch.no_grad():
        model.weight.mul_(3.0)
    after = native_hvp(engine, x, y, v)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, v @ explicit_hessian(model, F.cross_entropy, x, y), rtol=1e-9, atol=1e-11)


def test_float32_three_layer_tanh_against_reference():
    """Model (a)'s structure (Linear-Tanh-Linear-Tanh-Linear, cross-entropy) in float32, smaller:
    native against the op's float64 twin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    engine, _ = build_native_engine(model, F.cross_entropy)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    v = torch.randn(8, sum(p.numel() for p in model.parameters()))
    ref = _reference.mlp_hvp(x.double(), y, [m.weight.double() for m in model[::2]],
                             [m.bias.double() for m in model[::2]], v.double(),
                             [[("tanh", 0, 0)], [("tanh", 0, 0)], []], "cross_entropy")
    torch.testing.assert_close(native_hvp(engine, x, y, v).double(), ref, rtol=1e-4, atol=1e-6)


# ---- the op against its pure-torch twin, per device --------------------------------------------

OP_CASES = {
    # name: (n, d, widths, biases, chains, loss)
    "mlp": (9, 5, [6, 7, 5, 4], [True, False, True],
            [[("gelu", 0, 0)], [("softplus", 2.0, 1.0), ("tanh", 0, 0)], [("leaky_relu", 0.1, 0)]], "cross_entropy"),
    "empty_d": (4, 0, [3, 2], [True], [[]], "mse"),
    "empty_n_sum": (0, 3, [3, 4, 2], [True, True], [[("silu", 0, 0)], []], "bce_with_logits"),
    "size_one": (1, 1, [1, 1, 1], [True, True], [[("sigmoid", 0, 0)], []], "mse"),
    "wide_classes": (3, 2, [4, 40], [False], [[]], "cross_entropy"),
}


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "ggn"])
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_reference(device, case, gauss_newton):
    n, d, widths, biases, chains, loss = OP_CASES[case]
    gen = torch.Generator().manual_seed(11)
    reduction = "sum" if n == 0 else "mean"
    args = op_case(device, torch.float64, n, d, widths, biases, chains, loss, gen)
    got = _ops.mlp_hvp(*args, chains, loss, reduction, gauss_newton)
    want = _reference.mlp_hvp(*args, chains, loss, reduction, gauss_newton)
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # float32 against the float64 twin
    args32 = op_case(device, torch.float32, n, d, widths, biases, chains, loss,
                      torch.Generator().manual_seed(11))
    got32 = _ops.mlp_hvp(*args32, chains, loss, reduction, gauss_newton)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chain", [[("tanh", 0, 0)], [("gelu_tanh", 0, 0)], [("softplus", 1.0, 20.0)],
                                   [("softplus", 2.0, 1.0)], [("softplus", 0.5, 30.0)]],
                         ids=["tanh", "gelu_tanh", "softplus", "softplus_b2_t1", "softplus_b05_t30"])
def test_op_lone_activations_over_wide_preactivations(device, chain):
    """A lone Tanh, tanh-GELU or Softplus has its own vectorised CPU path; pre-activations from -60
    to 60 reach saturation, Softplus's threshold and exp(-|z|) far below float32's epsilon."""
    gen = torch.Generator().manual_seed(3)
    x, t, ws, bs, v = op_case(device, torch.float64, 11, 4, [5, 9, 3], [True, True], [chain, []],
                               "cross_entropy", gen)
    x = x * 20
    want = _reference.mlp_hvp(x, t, ws, bs, v, [chain, []], "cross_entropy", "mean")
    a = x @ ws[0].T + bs[0]
    assert float(a.min()) < -30 and float(a.max()) > 30
    torch.testing.assert_close(_ops.mlp_hvp(x, t, ws, bs, v, [chain, []], "cross_entropy", "mean"), want,
                               rtol=1e-9, atol=1e-11)
    # float32: 1 - tanh(a)^2 cancels for large |a| on every path (scalar or vectorised), so the
    # error is bounded against the largest entry, not entrywise
    got32 = _ops.mlp_hvp(x.float(), t, [w.float() for w in ws], [b.float() for b in bs], v.float(), [chain, []],
                         "cross_entropy", "mean")
    assert float((got32.double() - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "mse"])
@pytest.mark.parametrize("classes, hidden, bias", [(1, 8, True), (10, 21, True), (32, 64, False), (33, 16, True)],
                         ids=["c1_h8", "c10_h21", "c32_h64_nobias", "c33_gemms"])
def test_op_narrow_output_layer(classes, hidden, bias, loss, gauss_newton, dtype):
    """The CPU's fused pass over a float64 output layer of at most 32 logits (csrc/cpu/mlp_hvp_fused_head.cpp):
    hidden widths on and off its vector blocks, 23 rows (off its 4-row tiles), 1 and 2 threads (the
    directions split in parts); 33 logits, and float32, take the GEMMs instead."""
    chains = [[("tanh", 0, 0)], []]
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            args = op_case("cpu", torch.float64, 23, 7, [5, hidden, classes], [True, bias], chains, loss,
                            torch.Generator().manual_seed(classes + hidden))
            want = _reference.mlp_hvp(*args, chains, loss, "mean", gauss_newton)
            x, target, ws, bs, v = args
            cast = lambda u: u.to(dtype) if u is not None and u.is_floating_point() else u
            got = _ops.mlp_hvp(cast(x), cast(target), [cast(w) for w in ws], [cast(b) for b in bs], cast(v), chains,
                               loss, "mean", gauss_newton)
            assert got.dtype == dtype
            err = float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-3)  # CE on 1 class: 0
            assert err < (1e-13 if dtype == torch.float64 else 1e-5), f"{t} threads: {err:.1e} from the reference"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "ggn"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("hidden_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("chain", [[("tanh", 0, 0)], [("relu", 0, 0)], [], [("softplus", 2.0, 1.0), ("tanh", 0, 0)]],
                         ids=["tanh", "relu", "none", "softplus_tanh"])
def test_op_fused_head_takes_the_layer_before(chain, hidden_bias, depth, gauss_newton):
    """The fused float64 output-layer pass also applies the activation of the layer before it (its
    R-forward and R-backward, and its bias sums): curved (f'' g_h term), piecewise linear (none),
    no activation, a chain; that layer with and without bias, first or not (depth 3)."""
    widths = [6, 13, 11, 10][-(depth + 1):]
    chains = [[("sigmoid", 0, 0)]] * (depth - 2) + [chain, []]
    biases = [True] * (depth - 2) + [hidden_bias, True]
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            args = op_case("cpu", torch.float64, 23, 7, widths, biases, chains, "cross_entropy",
                            torch.Generator().manual_seed(depth))
            want = _reference.mlp_hvp(*args, chains, "cross_entropy", "mean", gauss_newton)
            got = _ops.mlp_hvp(*args, chains, "cross_entropy", "mean", gauss_newton)
            err = float((got - want).abs().max() / want.abs().max())
            assert err < 1e-13, f"{t} threads: {err:.1e} from the reference"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hessian", "ggn"])
def test_op_directions_split_across_threads(gauss_newton):
    """On the CPU the op splits the D directions into one part per thread (sizes differing by one
    at most, fewer parts where they would be uneven); every split gives the reference's answer."""
    n, _, widths, biases, chains, loss = OP_CASES["mlp"]
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 5):
            torch.set_num_threads(t)
            for d in (1, 2, 3, 5, 7, 13, 64):
                args = op_case("cpu", torch.float64, n, d, widths, biases, chains, loss,
                                torch.Generator().manual_seed(d))
                got = _ops.mlp_hvp(*args, chains, loss, "mean", gauss_newton)
                want = _reference.mlp_hvp(*args, chains, loss, "mean", gauss_newton)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{t} threads, D={d}: {m}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["auto", "blas"])
def test_op_cpu_gemm_backends(monkeypatch, backend):
    """float32 GEMMs on the CPU go to oneDNN where torch carries it (TWICEDIFF_CPU_GEMM unset or
    "auto"), to ATen's BLAS with "blas"; either way the op matches its float64 twin, on shapes that
    leave tails in every blocked dimension, on one thread and split across threads."""
    monkeypatch.setenv("TWICEDIFF_CPU_GEMM", backend)
    assert twicediff.build_info()["cpu_gemm"] == _C.cpu_gemm()
    if backend == "blas":
        assert _C.cpu_gemm() == "blas"
    elif torch.backends.mkldnn.is_available() and torch.__version__.startswith("2.14."):
        # verified on the torch this project pins (others may keep the BLAS), in a fresh process:
        # a GEMM that oneDNN refused earlier in this one sends every later GEMM to ATen's BLAS. On
        # CPUs without bf16 support torch 2.14's oneDNN refuses every float32 GEMM: BLAS, with the
        # refusal's message.
        import subprocess
        import sys

        fresh = subprocess.run([sys.executable, "-c", "import twicediff._C as C; print(C.cpu_gemm(), "
                                "repr(C.cpu_gemm_refusal()))"],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, TWICEDIFF_CPU_GEMM=backend, PYTHONPATH=os.pathsep.join(
                                   [os.path.dirname(os.path.dirname(twicediff.__file__))]
                                   + [p for p in [os.environ.get("PYTHONPATH")] if p])))
        assert fresh.returncode == 0, fresh.stderr
        backend, refusal = fresh.stdout.split(" ", 1)
        if "avx512bw" in refusal:  # the bf16 check of mkldnn_matmul: this CPU lacks AVX-512 BW/VL/DQ
            assert backend == "blas"
        else:
            assert (backend, refusal.strip()) == ("onednn", "''"), fresh.stdout
    chains = [[("tanh", 0, 0)], [("gelu", 0, 0)], []]
    threads = torch.get_num_threads()
    try:
        for t, (n, d) in ((1, (37, 5)), (2, (37, 5)), (2, (130, 19))):
            torch.set_num_threads(t)
            args = op_case("cpu", torch.float64, n, d, [33, 70, 17, 9], [True, False, True], chains,
                            "cross_entropy", torch.Generator().manual_seed(n + d))
            want = _reference.mlp_hvp(*args, chains, "cross_entropy", "mean")
            args32 = [[w.float() if w is not None else None for w in a] if isinstance(a, list)
                      else (a.float() if a.is_floating_point() else a) for a in args]
            got = _ops.mlp_hvp(*args32, chains, "cross_entropy", "mean")
            assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5, (t, n, d)
    finally:
        torch.set_num_threads(threads)


def test_op_cpu_gemm_follows_torch_mkldnn_switch(monkeypatch):
    """torch.backends.mkldnn.enabled = False, which keeps torch itself off oneDNN, keeps the native
    ops' GEMMs off it too."""
    monkeypatch.delenv("TWICEDIFF_CPU_GEMM", raising=False)
    enabled = torch.backends.mkldnn.enabled
    before = _C.cpu_gemm()
    try:
        torch.backends.mkldnn.enabled = False
        assert _C.cpu_gemm() == "blas"
    finally:
        torch.backends.mkldnn.enabled = enabled
    assert _C.cpu_gemm() == before  # switched back (onednn unless oneDNN refused a GEMM earlier)


def test_op_cpu_gemm_bad_setting(monkeypatch):
    monkeypatch.setenv("TWICEDIFF_CPU_GEMM", "mkl")
    args = op_case("cpu", torch.float64, *OP_CASES["mlp"][:3], OP_CASES["mlp"][3], OP_CASES["mlp"][4],
                    "cross_entropy", torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="TWICEDIFF_CPU_GEMM must be 'auto' or 'blas', got 'mkl'"):
        _ops.mlp_hvp(*args, OP_CASES["mlp"][4], "cross_entropy", "mean")
    with pytest.raises(ValueError, match="TWICEDIFF_CPU_GEMM"):
        _C.cpu_gemm()


def test_op_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(5)
    n, d, widths, biases, chains, loss = OP_CASES["mlp"]
    x, t, ws, bs, v = op_case(device, torch.float64, n, d, widths, biases, chains, loss, gen)
    x_nc = x.t().contiguous().t()
    ws_nc = [w.t().contiguous().t() for w in ws]
    v_nc = torch.cat([v, v], dim=1)[:, ::2]
    v_nc.copy_(v)
    assert not x_nc.is_contiguous() and not v_nc.is_contiguous()
    got = _ops.mlp_hvp(x_nc, t, ws_nc, bs, v_nc, chains, loss, "mean")
    torch.testing.assert_close(got, _reference.mlp_hvp(x, t, ws, bs, v, chains, loss, "mean"), rtol=1e-9, atol=1e-11)


def test_op_cuda_matches_cpu_and_half_precision(device):
    if device.type != "cuda":
        pytest.skip("needs a GPU")
    gen = torch.Generator().manual_seed(6)
    n, d, widths, biases, chains, loss = OP_CASES["mlp"]
    cpu = op_case(torch.device("cpu"), torch.float32, n, d, widths, biases, chains, loss, gen)
    cuda = [[t.cuda() if t is not None else None for t in a] if isinstance(a, list) else a.cuda() for a in cpu]
    want = _ops.mlp_hvp(*cpu, chains, loss, "mean")
    torch.testing.assert_close(_ops.mlp_hvp(*cuda, chains, loss, "mean").cpu(), want, rtol=1e-4, atol=1e-5)
    for half in (torch.float16, torch.bfloat16):
        args = [[t.to(half) if t is not None else None for t in a] if isinstance(a, list)
                else (a.to(half) if a.is_floating_point() else a) for a in cuda]
        got = _ops.mlp_hvp(*args, chains, loss, "mean")
        assert got.dtype == half
        torch.testing.assert_close(got.float().cpu(), want, rtol=5e-2, atol=5e-2)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(8)
    n, d, widths, biases, chains, loss = OP_CASES["mlp"]
    x, t, ws, bs, v = op_case(device, torch.float32, n, d, widths, biases, chains, loss, gen)
    counts, codes, params = encode_activations(chains)
    torch.library.opcheck(torch.ops.twicediff.mlp_hvp.default,
                          (x, t, ws, bs, v, counts, codes, params, LOSS_CODES[loss], 1, True))


# ---- declines and bad input ------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()


@pytest.mark.parametrize("loss_fn, words", [
    (functools.partial(F.cross_entropy, weight=torch.ones(3)), "weight"),
    (functools.partial(F.cross_entropy, label_smoothing=0.1), "label_smoothing"),
    (functools.partial(F.cross_entropy, ignore_index=0), "ignore_index"),
    (functools.partial(F.binary_cross_entropy_with_logits, pos_weight=torch.ones(3)), "pos_weight"),
    (functools.partial(F.mse_loss, reduction="none"), "reduction"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
    (nn.CrossEntropyLoss(label_smoothing=0.2), "label_smoothing"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    (nn.MSELoss(reduction="none"), "reduction"),
    (F.nll_loss, "nll_loss"),
    (nn.L1Loss(), "L1Loss"),
    (lambda a, b: F.mse_loss(a, b), "<lambda>"),
    (functools.partial(F.mse_loss, torch.zeros(3)), "positional"),
])
def test_declines_losses(loss_fn, words):
    engine, reason = build_native_engine(_mlp(), loss_fn)
    assert engine is None and words in reason


def _frozen_middle():
    m = _mlp()
    m[2].bias.requires_grad_(False)
    return m


def _tied():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    m[2].weight = m[0].weight
    return m


class _Custom(nn.Sequential):
    pass


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), "'1' (BatchNorm1d)"),
    (nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.ELU(), nn.Linear(5, 3))), "'1.0' (ELU)"),
    (nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 3)).train(), "'1' (Dropout) is in training"),
    (nn.Sequential(nn.Linear(4, 5), nn.Flatten(0), nn.Linear(5, 3)), "start_dim=0"),
    (_frozen_middle(), "frozen parameter(s) ['bias']"),
    (_tied(), "shared"),
    (nn.Conv1d(1, 2, 3), "Conv1d"),
    (_Custom(nn.Linear(4, 3)), "_Custom"),
])
def test_declines_models(model, words):
    engine, reason = build_native_engine(model, F.mse_loss)
    assert engine is None and words in reason, reason


def test_declines_frozen_everything_and_half_on_cpu():
    m = _mlp().requires_grad_(False)
    assert "no parameter that requires grad" in build_native_engine(m, F.mse_loss)[1]
    assert "float16" in build_native_engine(_mlp().half(), F.mse_loss)[1]


def test_bad_input_raises_clear_errors():
    model = _mlp()
    engine, _ = build_native_engine(model, F.cross_entropy)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    v = torch.randn(2, 43, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"V must have shape \[D, 43\]"):
        native_hvp(engine, x, y, v[:, :5])
    with pytest.raises(TypeError, match="V must be torch.float64"):
        native_hvp(engine, x, y, v.float())
    with pytest.raises(ValueError, match="mode must be one of"):
        native_hvp(engine, x, y, v, mode="fisher")
    with pytest.raises(NotNativeError, match="class-index"):
        native_hvp(engine, x, y.double(), v)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        native_hvp(engine, x, y + 3, v)
    with pytest.raises(NotNativeError, match="needs \\[N, in_features\\] rows"):
        native_hvp(engine, x.view(6, 1, 4), y, v)
    mse, _ = build_native_engine(model, F.mse_loss)
    with pytest.raises(NotNativeError, match=r"squeeze\(y\) has shape \[6, 2\]"):
        native_hvp(mse, x, torch.randn(6, 2, dtype=torch.float64), v)
    td = twicediff.TorchTwiceDifferentiable(model, F.mse_loss)
    assert "squeeze(y)" in td.native_unsupported_reason(x, torch.randn(6, 2, dtype=torch.float64))
    assert td.native_unsupported_reason(x, torch.randn(6, 3, dtype=torch.float64)) == ""
    model.train()  # no Dropout: training mode changes nothing
    assert build_native_engine(model, F.mse_loss)[0] is not None


def test_op_bad_arguments_name_them():
    x = torch.randn(4, 3)
    w = [torch.randn(2, 3)]
    v = torch.randn(1, 8)
    t = torch.randn(4, 2)
    op = lambda **kw: _ops.mlp_hvp(**{**dict(x=x, target=t, weights=w, biases=[torch.zeros(2)], directions=v,
                                             activations=[[]], loss="mse"), **kw})
    with pytest.raises(ValueError, match=r"directions must have shape \[D, P\] with P = 8"):
        op(directions=torch.randn(1, 7))
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \[2, 4\] so it takes 4 inputs"):
        op(weights=[torch.randn(2, 4)], directions=torch.randn(1, 10))
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype Double"):
        op(weights=[w[0].double()])
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \[2\]"):
        op(biases=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"target must have the model output's shape \[4, 2\]"):
        op(target=torch.randn(4, 3))
    with pytest.raises(ValueError, match="loss must be one of"):
        op(loss="hinge")
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        op(activations=[[("elu", 0, 0)]])
    with pytest.raises(ValueError, match="softplus beta"):
        op(activations=[[("softplus", 0.0, 20.0)]])
    with pytest.raises(ValueError, match="zero rows"):
        op(x=torch.randn(0, 3), target=torch.randn(0, 2))


# ---- through TorchTwiceDifferentiable: the engines against each other ------------------------------

@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_native_engine_agrees_with_func_and_autograd_engines(mode):
    from twicediff.torch import TorchTwiceDifferentiable

    torch.manual_seed(0)
    frozen = nn.Conv1d(1, 2, 3).requires_grad_(False)
    model = nn.Sequential(frozen, nn.Flatten(), nn.Linear(8, 6), nn.SiLU(), nn.Linear(6, 3)).double().eval()
    td = TorchTwiceDifferentiable(model, nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(4)
    x, y = make_batch("cross_entropy", 7, True, 3, gen)
    v = torch.randn(9, td.num_params, generator=gen, dtype=torch.float64)
    native = td.hvp(x, y, v, mode=mode, engine="native")
    for engine in ("func", "autograd"):
        torch.testing.assert_close(native, td.hvp(x, y, v, mode=mode, engine=engine), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(td.hvp(x, y, v[2], mode=mode, engine="native"), native[2], rtol=1e-12, atol=1e-13)
