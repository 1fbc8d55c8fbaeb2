"""The routing of torch's float32 CPU matmuls in the generic engines' products
(twicediff.torch.matmul_route): inside a scope, mm, addmm and bmm of every shape, layout and
scalar agree with float64 and give the same result on every call of a shape class, whichever
library took it; outside a scope, and in other threads, they are ATen's own, bit for bit; ATen's
errors stay ATen's; TWICEDIFF_MATMUL_ROUTE and TWICEDIFF_CPU_GEMM=blas turn it off; and the
engines' products under it agree with float64."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import twicediff
from twicediff import TorchTwiceDifferentiable
from twicediff.torch import matmul_route

from structured_models import attention_problem

ONEDNN = twicediff.build_info()["cpu_gemm"] == "onednn"
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN does not take float32 GEMMs in this process")


@pytest.fixture(autouse=True)
def _default_route(monkeypatch):
    monkeypatch.delenv(matmul_route.ENV, raising=False)
    monkeypatch.delenv("TWICEDIFF_CPU_GEMM", raising=False)


def _operand(g, rows, cols, layout):
    """A float32 [rows, cols] matrix in one of the layouts a product hands a GEMM."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=g)
    if layout == "transposed":
        return torch.randn(cols, rows, generator=g).t()
    if layout == "padded":  # rows of a wider matrix
        return torch.randn(rows, cols + 3, generator=g)[:, 1:cols + 1]
    if layout == "expanded":  # one row repeated
        return torch.randn(1, cols, generator=g).expand(rows, cols)
    raise ValueError(layout)


def _cases(seed=0, count=60):
    """(name, function, args): mm, addmm and bmm of generated sizes, layouts and scalars."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 7, 16, 33, 64, 130]
    layouts = ["contiguous", "transposed", "padded", "expanded"]

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    cases = []
    for k in range(count):
        m, n, kk = pick(sizes), pick(sizes), pick(sizes)
        a, b = _operand(g, m, kk, pick(layouts)), _operand(g, kk, n, pick(layouts))
        op = k % 3
        if op == 0:
            cases.append((f"mm {m}x{kk}x{n}", torch.mm, (a, b), {}))
        elif op == 1:
            c = pick([torch.randn(n, generator=g), torch.randn(1, n, generator=g), torch.randn(m, 1, generator=g),
                      torch.randn(m, n, generator=g), torch.randn(1, generator=g)])
            beta, alpha = pick([0.0, 1.0, 0.5]), pick([1.0, -2.0])
            if beta == 0.0:
                c = torch.full_like(c, float("nan"))  # not read when beta is 0
            cases.append((f"addmm {m}x{kk}x{n} c{tuple(c.shape)} beta={beta} alpha={alpha}", torch.addmm, (c, a, b),
                          {"beta": beta, "alpha": alpha}))
        else:
            batch = pick([1, 3, 8])
            first = torch.stack([_operand(g, m, kk, "contiguous") for _ in range(batch)])
            second = torch.stack([_operand(g, kk, n, "contiguous") for _ in range(batch)])
            form = pick(["plain", "first broadcast", "second broadcast", "both broadcast", "transposed"])
            if form in ("first broadcast", "both broadcast"):
                first = first[:1].expand(batch, m, kk)
            if form in ("second broadcast", "both broadcast"):
                second = second[:1].expand(batch, kk, n)
            if form == "transposed":
                first = first.transpose(1, 2).contiguous().transpose(1, 2)
            cases.append((f"bmm {batch}x{m}x{kk}x{n} {form}", torch.bmm, (first, second), {}))
    return cases


def _float64(fn, args, kwargs):
    if fn is torch.addmm:
        c, a, b = args
        c = torch.zeros_like(c) if kwargs["beta"] == 0.0 else c
        return torch.addmm(c.double(), a.double(), b.double(), **kwargs)
    return fn(*(t.double() for t in args))


def _out(form, shape):
    """An out= tensor: of the result's shape, rows of a wider matrix, or empty (ATen resizes it)."""
    if form == "out":
        return torch.full(shape, float("nan"))
    if form == "padded out":
        return torch.full((*shape[:-1], shape[-1] + 5), float("nan"))[..., 2:shape[-1] + 2]
    return torch.empty(0)


@needs_onednn
@pytest.mark.parametrize("route", ["auto", "onednn"])
@pytest.mark.parametrize("form", ["result", "out", "padded out", "resized out"])
def test_routed_matmuls_agree_with_float64_and_repeat_exactly(route, form, monkeypatch):
    """mm, addmm and bmm, returning their result or writing out= (compiled products call those)."""
    monkeypatch.setenv(matmul_route.ENV, route)
    for name, fn, args, kwargs in _cases(seed=1 if route == "auto" else 2):
        want = _float64(fn, args, kwargs)
        copies = [t.clone() for t in args]
        got = []
        with matmul_route.routing_matmuls(torch.empty(1)):
            for _ in range(3):  # the first call of a class times both libraries
                if form == "result":
                    got.append(fn(*args, **kwargs))
                    assert got[-1].is_contiguous(), name
                else:
                    out = _out(form, want.shape)
                    assert fn(*args, **kwargs, out=out) is out, name
                    got.append(out)
        unchanged = [torch.allclose(t, c, rtol=0, atol=0, equal_nan=True) for t, c in zip(args, copies)]
        assert all(unchanged), f"{name}: an input changed"
        scale = _float64(torch.bmm if fn is torch.bmm else torch.mm, [t.abs() for t in args[-2:]], {}).max()
        for r in got:
            assert r.dtype == torch.float32 and r.shape == want.shape, name
            assert (r.double() - want).abs().max() <= 1e-5 * (scale + 1), f"{name}, {form}"
            assert torch.equal(r, got[0]), f"{name}, {form}: another library's result on a later call"


@needs_onednn
def test_timed_classes_are_counted_and_untimed_ones_are_not(monkeypatch):
    a, b = torch.randn(37, 11), torch.randn(11, 5)
    matmul_route.forget()
    with matmul_route.routing_matmuls(a):
        torch.mm(a, b)
        torch.mm(a, b)
    first = matmul_route.decisions()
    assert first["classes"] == 1 and first["onednn"] in (0, 1) and first["seconds"] > 0
    with matmul_route.routing_matmuls(a):
        torch.mm(a[:, :7], b[:7])  # another shape class
    assert matmul_route.decisions()["classes"] == 2
    monkeypatch.setenv(matmul_route.ENV, "onednn")
    with matmul_route.routing_matmuls(a):
        torch.mm(a[:, :3], b[:3])
    assert matmul_route.decisions()["classes"] == 2
    assert twicediff.build_info()["cpu_matmul_route"] == matmul_route.decisions()


@needs_onednn
@pytest.mark.parametrize("setting", [(matmul_route.ENV, "aten"), ("TWICEDIFF_CPU_GEMM", "blas")])
def test_the_environment_turns_routing_off(setting, monkeypatch):
    td, x, y = _problem()
    matmul_route.forget()
    monkeypatch.setenv(*setting)
    td.hvp(x, y, torch.randn(2, td.num_params), engine="func")
    assert matmul_route.decisions()["classes"] == 0


def test_a_bad_route_setting_is_named(monkeypatch):
    td, x, y = _problem()
    monkeypatch.setenv(matmul_route.ENV, "fastest")
    with pytest.raises(ValueError, match="^TWICEDIFF_MATMUL_ROUTE must be one of auto, onednn, aten, got .fastest.$"):
        td.hvp(x, y, torch.randn(2, td.num_params), engine="func")


@needs_onednn
def test_float64_and_other_threads_are_not_routed():
    matmul_route.forget()
    a = torch.randn(29, 13)
    with matmul_route.routing_matmuls(a.double()):
        torch.mm(a, a.t())  # a float64 product opens no scope
    assert matmul_route.decisions()["classes"] == 0
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        torch.mm(a, a.t())
        torch.bmm(a[None], a.t()[None])
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with matmul_route.routing_matmuls(a):
        inside.set()
        done.wait(timeout=60)
    thread.join()
    assert done.is_set() and matmul_route.decisions()["classes"] == 0


@needs_onednn
def test_a_scope_left_by_an_exception_is_closed():
    matmul_route.forget()
    a = torch.randn(31, 17)
    with pytest.raises(KeyError):
        with matmul_route.routing_matmuls(a), matmul_route.routing_matmuls(a):
            raise KeyError("inside")
    torch.mm(a, a.t())
    assert matmul_route.decisions()["classes"] == 0


@pytest.mark.parametrize("call", [
    lambda: torch.mm(torch.randn(2, 3), torch.randn(4, 5)),
    lambda: torch.bmm(torch.randn(2, 3, 4), torch.randn(3, 4, 5)),
    lambda: torch.addmm(torch.randn(7), torch.randn(2, 3), torch.randn(3, 5)),
    lambda: torch.mm(torch.randn(2, 3), torch.randn(3, 4, dtype=torch.float64)),
])
def test_atens_errors_stay_atens(call):
    with pytest.raises(RuntimeError) as outside:
        call()
    with matmul_route.routing_matmuls(torch.empty(1)):
        with pytest.raises(RuntimeError) as inside:
            call()
    assert str(inside.value) == str(outside.value)


def test_outside_a_scope_matmuls_are_atens_bit_for_bit():
    """In a fresh process: torch's matmuls before any routing and after products that routed."""
    script = r"""
import torch, torch.nn.functional as F
import twicediff
from structured_models import attention_problem
g = torch.Generator().manual_seed(0)
a, b, c = torch.randn(300, 70, generator=g), torch.randn(70, 90, generator=g), torch.randn(90, generator=g)
A, B = torch.randn(6, 40, 30, generator=g), torch.randn(6, 30, 20, generator=g)
def all_():
    return [torch.mm(a, b), torch.addmm(c, a, b), torch.bmm(A, B), a @ b, F.linear(a, b.t(), c), A @ B[0],
            torch.mm(a, b, out=torch.empty(300, 90)), torch.addmm(c, a, b, out=torch.empty(300, 90)),
            torch.bmm(A, B, out=torch.empty(6, 40, 20))]
before = all_()
model, x, y = attention_problem(20, 8)
td = twicediff.TorchTwiceDifferentiable(model, F.cross_entropy)
for _ in range(2):
    td.hvp(x, y, torch.randn(9, td.num_params), engine="func")
classes = twicediff.build_info()["cpu_matmul_route"]["classes"]
after = all_()
assert all(torch.equal(p, q) for p, q in zip(before, after)), "outside a scope, results changed"
assert twicediff.build_info()["cpu_matmul_route"]["classes"] == classes, "matmuls outside a scope were timed"
print("ok", classes)
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # twicediff from where this process imported it (the source tree or an install), and the test helpers.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(twicediff.__file__)), os.path.join(root, "tests")]))
    env.pop(matmul_route.ENV, None)
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
    if ONEDNN:
        assert int(out.stdout.split()[1]) > 0, "the products routed nothing"


def _problem(seed=0):
    model, x, y = attention_problem(24, 8, seed)
    return TorchTwiceDifferentiable(model, F.cross_entropy), x, y


@pytest.mark.parametrize("route", ["auto", "onednn", "aten"])
@pytest.mark.parametrize("engine", ["func", "autograd", "loop"])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_routed_products_agree_with_float64(route, engine, mode, monkeypatch):
    monkeypatch.setenv(matmul_route.ENV, route)
    td, x, y = _problem()
    v = torch.randn(6, td.num_params)
    td64 = TorchTwiceDifferentiable(attention_problem(24, 8)[0].double(), F.cross_entropy)  # _problem's model
    want = td64.hvp(x.double(), y, v.double(), engine="autograd", mode=mode)
    got = [td.hvp(x, y, v, engine=engine, mode=mode) for _ in range(2)]
    for r in got:
        assert (r.double() - want).abs().max() <= 1e-4 * (want.abs().max() + 1)
    assert torch.equal(got[0], got[1])


@needs_onednn
def test_a_timed_engine_call_leaves_the_routing_timing_out():
    """auto times engines with probe.timed_call: the first product of new matmul shape classes
    times both libraries, which later calls do not pay, so it is not the engine's time."""
    from twicediff.torch.engines import probe

    matmul_route.forget()
    pairs = [(torch.randn(50 + k, 20), torch.randn(20, 40)) for k in range(4)]

    def product():
        with matmul_route.routing_matmuls(pairs[0][0]):
            return [torch.mm(a, b) for a, b in pairs]

    before = matmul_route.thread_seconds()
    start = time.perf_counter()
    _, seconds = probe.timed_call(product)
    wall = time.perf_counter() - start
    timing = matmul_route.thread_seconds() - before
    assert timing > 0 and matmul_route.decisions()["classes"] == 4
    assert seconds <= wall - timing


def test_an_out_sharing_an_input_is_left_to_aten():
    a, b = torch.randn(20, 20), torch.randn(20, 20)
    plain = a.clone()
    torch.mm(plain, b, out=plain)
    routed = a.clone()
    with matmul_route.routing_matmuls(routed):
        torch.mm(routed, b, out=routed)
    assert torch.equal(routed, plain)
