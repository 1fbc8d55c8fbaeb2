"""The library-wide memory budget: the setting, chunked results identical to unchunked ones, a
clear error when one chunk cannot fit, and peak memory kept near the budget."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff.torch.engines import probe
from twicediff import MemoryBudgetError, TorchTwiceDifferentiable, get_memory_budget, memory_budget, set_memory_budget
from twicediff.memory import chunk_size, free_bytes
from twicediff.torch.engines import base as engine_caps


@pytest.fixture(autouse=True)
def default_budget():
    set_memory_budget(None)
    yield
    set_memory_budget(None)


def _model(device, n=17):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).to(device=device, dtype=torch.float64).eval()
    x = torch.randn(n, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (n,), device=device)
    return TorchTwiceDifferentiable(model, F.cross_entropy), x, y


def test_setting_and_context_manager():
    assert twicediff.MemoryBudgetError is MemoryBudgetError and issubclass(MemoryBudgetError, MemoryError)
    set_memory_budget(10_000)
    assert get_memory_budget() == 10_000
    with memory_budget(2_000):
        assert get_memory_budget() == 2_000
        with memory_budget(None):
            assert get_memory_budget() > 10_000  # the default, from free memory
        assert get_memory_budget() == 2_000
    assert get_memory_budget() == 10_000
    with pytest.raises(KeyError):
        with memory_budget(3_000):
            raise KeyError("inside")
    assert get_memory_budget() == 10_000


def test_default_is_half_the_free_memory_of_the_device(device):
    free = free_bytes(device)
    budget = get_memory_budget(device)
    assert 0.3 * free <= budget <= 0.7 * free  # half of free memory, which moves a little meanwhile


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), ("1GB", TypeError), (True, TypeError)])
def test_bad_budget(bad, error):
    with pytest.raises(error, match=rf"nbytes must be .*got {bad!r}|nbytes must be .*got {type(bad).__name__}"):
        set_memory_budget(bad)
    with pytest.raises(error, match="nbytes"):
        with memory_budget(bad):
            pass


def test_chunk_size():
    with memory_budget(1_000):
        assert chunk_size(100, 100, fixed_bytes=50) == 9
        assert chunk_size(5, 100) == 5
        assert chunk_size(0, 10**12) == 0
        with pytest.raises(MemoryBudgetError, match=r"1,001 bytes.*1,000 bytes.*set_memory_budget"):
            chunk_size(3, 1_001, what="things")


def _bar_total(capsys, desc):
    """The number of steps of the last progress bar named ``desc`` written to stderr."""
    import re
    totals = re.findall(rf"{desc}[^|\r\n]*\|[^|]*\|\s*\d+/(\d+)", capsys.readouterr().err)
    assert totals, f"no {desc!r} progress bar"
    return int(totals[-1])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_chunked_mvp_identical(device, capsys):
    td, x, y = _model(device)
    g = td.grad(x, y, create_graph=True)
    v = torch.randn(20, td.num_params, dtype=torch.float64, device=device)
    whole = td.mvp(g, v, td.parameters, progress=True)
    assert _bar_total(capsys, "mvp") == 1
    budget = 1
    while True:  # the smallest budget that holds one direction
        try:
            with memory_budget(budget):
                td.mvp(g, v[:1], td.parameters)
            break
        except MemoryBudgetError:
            budget *= 2
    with memory_budget(3 * budget):
        chunked = td.mvp(g, v, td.parameters, progress=True)
    assert 1 < _bar_total(capsys, "mvp") < 20
    assert _rel(chunked, whole) <= 1e-12


@pytest.mark.parametrize("engine", ["native", "func", "autograd"])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_chunked_hvp_identical(device, engine, mode):
    td, x, y = _model(device)
    v = torch.randn(20, td.num_params, dtype=torch.float64, device=device)
    whole = td.hvp(x, y, v, engine=engine, mode=mode)
    product = td.hvp_function(x, y, engine=engine, mode=mode)
    assert product.engine.name == engine
    with memory_budget(4 * product.bytes_per_direction):
        chunked = product(v)
    assert product.calls == 5  # 20 directions in chunks of 4
    assert _rel(chunked, whole) <= 1e-12


def _generic(td):
    """The same model under a loss the native engine does not recognise (the generic column path)."""
    return TorchTwiceDifferentiable(td.model, lambda out, target: F.cross_entropy(out, target))


def test_chunked_hessian_identical(device, capsys):
    td, x, y = _model(device)
    whole = td.hessian(x, y)  # native model: assembled blockwise
    generic = _generic(td)
    P = td.num_params
    per_direction = generic.hvp_function(x, y).bytes_per_direction
    with memory_budget(10 * (2 * P * 8 + per_direction)):
        chunked = generic.hessian(x, y, progress=True)
    assert _bar_total(capsys, "hessian") == -(-P // 10)
    assert _rel(chunked, whole) <= 1e-12
    torch.testing.assert_close(whole, whole.T, rtol=1e-12, atol=1e-14)
    td.hessian(x, y, progress=True)
    assert _bar_total(capsys, "hessian") == 1  # all rows in one chunk
    with memory_budget(20_000):
        assembled = td.hessian(x, y, progress=True)
    assert _bar_total(capsys, "hessian") > 1  # rows of the batch in several chunks
    assert _rel(assembled, whole) <= 1e-12


def test_too_small_budget_raises_naming_the_setting(device):
    td, x, y = _model(device)
    g = td.grad(x, y, create_graph=True)
    v = torch.randn(3, td.num_params, dtype=torch.float64, device=device)
    with memory_budget(100):
        with pytest.raises(MemoryBudgetError, match=r"mvp directions.*memory budget is 100 bytes.*set_memory_budget"):
            td.mvp(g, v, td.parameters)
        for engine in ("native", "func", "autograd"):
            with pytest.raises(MemoryBudgetError, match=r"hvp directions.*set_memory_budget"):
                td.hvp(x, y, v, engine=engine)
        with pytest.raises(MemoryBudgetError, match=r"Hessian assembly rows.*set_memory_budget"):
            td.hessian(x, y)
        with pytest.raises(MemoryBudgetError, match=r"Hessian columns.*set_memory_budget"):
            _generic(td).hessian(x, y)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, torch
    from torch import nn
    torch.set_num_threads(1)
    import twicediff
    from twicediff import TorchTwiceDifferentiable, memory_budget
    import sys; sys.path.insert(0, BENCHMARKS)
    from harness import peak_rss_bytes, reset_peak_rss
    from twicediff.app.presets import make_mlp
    torch.manual_seed(0)
    model, loss, x, y = make_mlp([32, 256, 256, 10], nn.Tanh, 512)
    td = TorchTwiceDifferentiable(model, loss)
    P = td.num_params

    def extra_bytes(D, budget, kind):
        v = torch.randn(D, P)
        g = td.grad(x, y, create_graph=True) if kind == "mvp" else None
        twicediff.release_cpu_block_cache()  # blocks held from the call before are not this call's
        reset_peak_rss()
        base = peak_rss_bytes()
        with memory_budget(budget):
            td.mvp(g, v, td.parameters) if kind == "mvp" else td.hvp(x, y, v, engine=kind)
        return peak_rss_bytes() - base

    out = {"out_bytes": 32 * P * 4}
    for kind in ("native", "func", "autograd", "mvp"):
        extra_bytes(32, BUDGET, kind)  # warm-up: the same call, so one-off costs are not counted
        out[kind] = {"budget": extra_bytes(32, BUDGET, kind), "free": extra_bytes(32, None, kind)}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_stays_near_the_budget():
    """In a fresh process (large tensors mmapped so that freed memory leaves the resident set), for
    every engine and mvp:
    32 directions under a 32 MiB budget grow the resident set by at most the budget plus the
    [32, P] result, while without the budget the generic engines and mvp take several times more.
    (The native op takes a part's directions a few per R-pass on the CPU, its scratch given back
    between passes, so without a budget it grows little more than with one.) The budgeted call is
    made once before it is measured: the first call with new GEMM shapes also leaves oneDNN's
    generated kernels behind (a few MB, kept for the next call; see twicediff.memory)."""
    budget = 32 * 2**20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(twicediff.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    script = _PEAK_SCRIPT.replace("BUDGET", str(budget)).replace("BENCHMARKS", repr(benchmarks))
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("native", "func", "autograd", "mvp"):
        assert res[kind]["budget"] <= budget + res["out_bytes"], (kind, res)
        if kind != "native":
            assert res[kind]["free"] > 2 * res[kind]["budget"], (kind, res)


def _loader(x, y, batch=6):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _small_feasible_budget(td, x, y):
    """A budget that holds a few directions or columns at a time, so everything is chunked."""
    P = td.num_params
    generic = td.hvp_function(x, y, engine="func").bytes_per_direction
    per = max(td.hvp_function(x, y).bytes_per_direction, generic + 2 * P * 8, 3 * P * 8)
    return 4 * per


@pytest.mark.parametrize("method, kwargs", [("direct", {}), ("cg", {"rtol": 1e-10, "atol": 1e-12}),
                                            ("lissa", {"maxiter": 30, "scale": 50.0, "on_failure": "warn"}),
                                            ("arnoldi", {"rank_estimate": 5})])
def test_solvers_chunked_identical_and_too_small_budget_raises(method, kwargs):
    from twicediff.inversion import solve_hvp

    td, x, y = _model("cpu")
    b = torch.randn(12, td.num_params, dtype=torch.float64)
    torch.manual_seed(1)  # LiSSA draws its batches at random
    whole = solve_hvp(method, td, _loader(x, y), b, hessian_perturbation=0.5, **kwargs).x
    with memory_budget(_small_feasible_budget(td, x, y)):
        torch.manual_seed(1)
        chunked = solve_hvp(method, td, _loader(x, y), b, hessian_perturbation=0.5, **kwargs).x
    # The products agree to rounding (≤ 1e-12, tested above); iterations can amplify that rounding.
    assert _rel(chunked, whole) <= (1e-12 if method == "direct" else 1e-8)
    with memory_budget(64), pytest.raises(MemoryBudgetError, match="set_memory_budget"):
        solve_hvp(method, td, _loader(x, y), b, hessian_perturbation=0.5, **kwargs)


def test_influence_chunked_identical_and_too_small_budget_raises():
    from twicediff.influence import compute_influences, compute_self_influences

    td, x, y = _model("cpu")
    loader = _loader(x, y)
    up = compute_influences(td, loader, hessian_regularization=0.5)
    self_inf = compute_self_influences(td, loader, hessian_regularization=0.5)
    with memory_budget(_small_feasible_budget(td, x, y)):
        assert _rel(compute_influences(td, loader, hessian_regularization=0.5), up) <= 1e-12
        assert _rel(compute_self_influences(td, loader, hessian_regularization=0.5), self_inf) <= 1e-12
    with memory_budget(64), pytest.raises(MemoryBudgetError, match="set_memory_budget"):
        compute_influences(td, loader, hessian_regularization=0.5)


def test_native_scratch_is_kept_reused_and_released():
    """The CPU native op keeps its intermediates' buffer between calls; reusing it (also after it
    grew, or shrank for a smaller call) changes no result, and releasing it frees it."""
    # One op call per hvp call: the GEMM library's timed probe (several calls) is pinned.
    probe.set_choice("cpu_gemm", "onednn")
    try:
        _scratch_checks()
    finally:
        probe.set_choice("cpu_gemm", None)


def _scratch_checks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).eval()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    small, large = torch.randn(3, td.num_params), torch.randn(50, td.num_params)
    twicediff.release_native_scratch()
    assert twicediff.native_scratch_bytes() == 0
    want_small = td.hvp(x, y, small, engine="native")  # no buffer yet: blocks from the allocator
    assert twicediff.native_scratch_bytes() == 0  # ... and the size is learnt for the next call
    assert torch.equal(td.hvp(x, y, small, engine="native"), want_small)
    held = twicediff.native_scratch_bytes()
    assert held > 0
    want_large = td.hvp(x, y, large, engine="native")  # outgrows it: the next call gets a larger one
    td.hvp(x, y, large, engine="native")
    assert twicediff.native_scratch_bytes() > held
    for _ in range(2):
        assert torch.equal(td.hvp(x, y, large, engine="native"), want_large)
        assert torch.equal(td.hvp(x, y, small, engine="native"), want_small)
    twicediff.release_native_scratch()
    assert twicediff.native_scratch_bytes() == 0
    assert torch.equal(td.hvp(x, y, small, engine="native"), want_small)


@pytest.mark.parametrize("engine", ["func", "autograd"])
def test_generic_engines_keep_chunks_near_their_working_set_cap(engine, monkeypatch):
    td, x, y = _model("cpu")
    v = torch.randn(10, td.num_params, dtype=torch.float64)
    whole = td.hvp(x, y, v, engine=engine)
    per_direction = td.hvp_function(x, y, engine=engine).bytes_per_direction
    monkeypatch.setattr(engine_caps, "GENERIC_CHUNK_BYTES", 3 * per_direction)
    monkeypatch.setattr(engine_caps, "CACHED_GENERIC_CHUNK_BYTES", 3 * per_direction)
    monkeypatch.setattr(engine_caps, "MIN_GENERIC_DIRECTIONS", 2)
    product = td.hvp_function(x, y, engine=engine)
    assert _rel(product(v), whole) <= 1e-12
    assert product.calls == 4  # 10 directions in chunks of 3, whatever the (large) budget
    native = td.hvp_function(x, y, engine="native")
    native(v)
    assert native.calls == 1  # the native engine is not capped


def test_generic_chunks_hold_a_floor_of_directions(monkeypatch):
    """A direction over the working-set cap still shares its chunk with MIN_GENERIC_DIRECTIONS - 1
    others (each chunk repeats the primal pass), unless the memory budget forbids it."""
    td, x, y = _model("cpu")
    v = torch.randn(10, td.num_params, dtype=torch.float64)
    monkeypatch.setattr(engine_caps, "GENERIC_CHUNK_BYTES", 1)
    monkeypatch.setattr(engine_caps, "CACHED_GENERIC_CHUNK_BYTES", 1)
    monkeypatch.setattr(engine_caps, "MIN_GENERIC_DIRECTIONS", 4)
    product = td.hvp_function(x, y, engine="func")
    product(v)
    assert product.calls == 3  # 10 directions in chunks of 4
    product = td.hvp_function(x, y, engine="func")
    with memory_budget(2 * product.bytes_per_direction):
        product(v)
    assert product.calls == 5  # the budget holds 2


def test_even_step_covers_the_items_in_as_few_chunks_of_about_one_size():
    from twicediff.memory import even_step

    assert even_step(64, 43) == 32  # two of 32, not 43 and 21
    assert even_step(64, 64) == 64 and even_step(64, 200) == 64
    assert even_step(10, 3) == 3  # four chunks are needed either way
    assert even_step(100, 28) == 25
    assert even_step(1, 1) == 1 and even_step(0, 5) == 1
    for total in range(1, 60):
        for most in range(1, 70):
            step = even_step(total, most)
            chunks = -(-total // step)
            assert 1 <= step <= max(most, 1) and chunks == -(-total // most), (total, most, step)


def test_chunk_size_takes_a_cap_and_evens_the_chunks():
    with memory_budget(10_000):
        assert chunk_size(64, 100) == 64  # all fit
        assert chunk_size(64, 100, most=43) == 32  # two of 32 under the cap, not 43 and 21
        assert chunk_size(10, 4_000) == 2  # the budget holds 2 of 4,000 bytes: 5 chunks of 2
        assert chunk_size(7, 4_000) == 2  # 4 chunks either way: 2, 2, 2, 1
        assert chunk_size(9, 300, most=5) == 5 and chunk_size(11, 300, most=5) == 4


_RECURRENT_PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from twicediff import TorchTwiceDifferentiable

    class Seq(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.rnn, self.head = cell(8, 32, num_layers=2, batch_first=True), nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    td = TorchTwiceDifferentiable(Seq({"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[sys.argv[1]]).eval(),
                                  F.cross_entropy)
    x, y = torch.randn(32, 60, 8), torch.randint(0, 3, (32,))
    td.hvp(x, y, torch.randn(2, td.num_params), engine="func")
    peaks = []
    for d in (2, 10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        td.hvp(x, y, torch.randn(d, td.num_params), engine="func")
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"per_direction": (peaks[1] - peaks[0]) / 8,
                      "estimate": td.hvp_function(x, y, engine="func").bytes_per_direction}))
""")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_recurrent_models_directions_take_no_more_than_their_estimate(cell):
    """A recurrent module's products hold every step's gates: the estimate a memory budget chunks by
    counts them (it counted the module's outputs alone, 8–45× under the func engine's peak). The
    peak resident set's growth per direction, between 2 and 10 directions in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _RECURRENT_PEAK, cell], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["per_direction"] <= figures["estimate"], figures
