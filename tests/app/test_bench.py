"""twicediff.app.bench (the benchmark of ``twicediff bench``) and the benchmark scripts' harness: the
rows, the table, the plot and the JSON, on a tiny preset (no timing asserts)."""
import json

import pytest
import torch
from torch import nn

from twicediff import TorchTwiceDifferentiable
from twicediff.app import bench
from twicediff.app.presets import make_mlp

harness = pytest.importorskip("harness", reason="benchmarks/harness.py (tests/conftest.py puts benchmarks/ on sys.path)")


@pytest.fixture
def tiny_preset(monkeypatch):
    presets = dict(bench.PRESETS)
    presets["tiny"] = ("MLP 4-6-3 Tanh, N=8", lambda device: make_mlp([4, 6, 3], nn.Tanh, 8, device=device))
    monkeypatch.setattr(bench, "PRESETS", presets)
    return "tiny"


def test_run_rows_table_plot_json(tiny_preset, tmp_path):
    seen = []
    rows = bench.run(tiny_preset, directions=(1, 2, bench.BUDGET_DIRECTIONS), repeats=1,
                     extra_methods=harness.EXTRA_METHODS, on_rows=seen.append)
    assert [r for batch in seen for r in batch] == rows and len(seen) == 3  # one batch of rows per D
    methods = {(r["D"], r["method"]) for r in rows}
    for D in (1, 2, bench.BUDGET_DIRECTIONS):
        assert {(D, m) for m in ("native", "native_gemms", "func", "autograd", "loop", "vmap_jvp_grad", "grad",
                                 "grad_warm")} <= methods
    assert (bench.BUDGET_DIRECTIONS, f"auto@{bench.BUDGET_BYTES}") in methods and (2, "auto") not in methods
    for r in rows:
        if r["method"] == "loop":
            assert r["vs_loop"] == pytest.approx(1.0)
        if r["method"] in ("grad", "grad_warm", "native_gemms"):
            assert r["hvps_per_s"] is None
            if r["method"] == "grad_warm":
                assert f"{bench.GRAD_CALLS} back to back" in r["note"] and "HVP costs" in r["note"]
        else:
            assert r["hvps_per_s"] > 0 and r["hvp_in_grads"] > 0
    table = bench.format_table(rows)
    assert table.count("\n| tiny |") == len(rows) and "Budget check (tiny" in table
    bench.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.to_json(rows, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == rows


def test_native_row_states_its_overhead_over_its_gemms(tiny_preset):
    rows = bench.run(tiny_preset, directions=(3,), engines=["native"], repeats=1,
                     extra_methods=harness.EXTRA_METHODS)
    by = {r["method"]: r for r in rows}
    assert by["native"]["note"].endswith("× its GEMMs alone")
    ratio = float(by["native"]["note"].split("×")[0])
    # the note rounds to two decimals
    assert ratio == pytest.approx(by["native"]["seconds"] / by["native_gemms"]["seconds"], rel=0.01, abs=0.005)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_gemms_replays_any_native_stack(dtype):
    # a frozen prefix, a bias-free layer and two activations: the shapes the replay must follow
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 4))
    model = model.to(dtype).eval()
    model[0].requires_grad_(False)
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    x, y = torch.randn(9, 5, dtype=dtype), torch.randint(0, 4, (9,))
    v = torch.randn(300, td.num_params, dtype=dtype)  # more than one chunk of directions
    harness.native_gemms(td, x, y, v)()


def test_native_gemms_needs_a_native_model():
    td = TorchTwiceDifferentiable(nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten()), nn.functional.mse_loss)
    from twicediff import NotNativeError

    with pytest.raises(NotNativeError, match="Conv1d"):
        harness.native_gemms(td, torch.randn(2, 1, 3), torch.randn(2, 3), torch.randn(1, 2))
    assert harness.EXTRA_METHODS["native_gemms"](td, torch.randn(2, 1, 3), torch.randn(2, 3), None) is None


def test_methods_compute_the_same_products(tiny_preset):
    td, x, y = bench._setup(tiny_preset, "cpu")
    td = TorchTwiceDifferentiable(td.model.double(), td.loss)
    x = x.double()
    v = bench._directions(td, 3, x)
    expected = td.hvp(x, y, v, engine="autograd")
    for method in ("func", "loop", "vmap_jvp_grad", "auto", f"auto@{bench.BUDGET_BYTES}"):
        torch.testing.assert_close(bench._method_call(method, td, x, y, v)(), expected, rtol=1e-10, atol=1e-12)


def test_peak_memory_in_process(tiny_preset):
    peak = harness.measure_peak(tiny_preset, "cpu", "func", 4, None)
    assert peak["peak_mb"] > 0 and peak["extra_mb"] >= 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset must be one of"):
        bench.run("zz")
    with pytest.raises(ValueError, match="engines must be a subset"):
        bench.run("a", engines=["fast"])
    with pytest.raises(ValueError, match="directions must be positive"):
        bench.run("a", directions=(0,))


def test_interleaved_medians_alternates_order_and_repeats_short_calls():
    """Every function is warmed up once, then timed once per round, the order reversed every
    other round; ``calls`` runs one back to back per timing; the clock is the caller's."""
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    ticks = iter(range(10 ** 6))
    med = bench.interleaved_medians(fns, 3, calls={"b": 4}, clock=lambda: float(next(ticks)))
    assert log == ["a", "b", "c"] + ["a"] + ["b"] * 4 + ["c"] + ["c"] + ["b"] * 4 + ["a"] + ["a"] + ["b"] * 4 + ["c"]
    assert med == {"a": 1.0, "b": 0.25, "c": 1.0}  # one tick per timing, over the calls it covered


def test_untimed_first_calls_run_before_each_timing_and_are_not_timed():
    """Each timing is preceded by the function's own untimed calls, so what the function before it
    left behind is not in its time."""
    log = []
    now = [0.0]

    def step(name, cost):
        log.append(name)
        now[0] += cost

    fns = {"a": lambda: step("a", 1.0), "b": lambda: step("b", 5.0)}
    med = bench.interleaved_medians(fns, 2, untimed_first=2, clock=lambda: now[0])
    assert log == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert med == {"a": 1.0, "b": 5.0}


def test_interleaved_medians_by_clock_reads_every_clock_in_the_same_timings():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    fast, slow = iter(range(10 ** 6)), iter(range(0, 10 ** 6, 3))
    med = bench.interleaved_medians_by_clock(fns, 3, calls={"b": 2}, clocks={"wall": lambda: float(next(fast)),
                                                                             "cpu": lambda: float(next(slow))})
    assert log == ["a", "b"] + ["a", "b", "b"] + ["b", "b", "a"] + ["a", "b", "b"]  # each timed once a round
    assert med == {"wall": {"a": 1.0, "b": 0.5}, "cpu": {"a": 3.0, "b": 1.5}}


def test_machine_and_commit_name_what_the_tables_state():
    from twicediff import _C

    stated = harness.machine()
    assert "logical CPUs; native float32 GEMMs: " + _C.cpu_gemm() in stated, stated
    assert "ISA " + torch.backends.cpu.get_cpu_capability() in stated, stated
    flags = harness.cpu_flags().split()
    assert all(f in harness.GEMM_FLAGS for f in flags) and (not flags or "flags " + " ".join(flags) in stated)
    assert ("oneDNN refused" in stated) == bool(_C.cpu_gemm_refusal()), stated
    sha = harness.git_commit()
    assert sha == "unknown" or sha.split()[0].isalnum()


def test_the_installed_package_does_no_benchmark_plumbing():
    """git, /proc and subprocesses belong to the benchmark scripts, not to twicediff.app.bench."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(bench))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"subprocess", "platform"}, imported
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and not node.value.startswith(("The ", "One ", "Benchmark", "A ", "Write", "HVPs", "``"))]
    assert not [s for s in strings if "/proc" in s or s == "git"]


def test_settle_auto_calls_until_auto_keeps_one_engine():
    """auto times candidates at size on its first calls of a shape class; settle_auto calls until
    that is over (so a benchmark times the engine kept), and stops at max_calls whatever happens."""
    from twicediff.torch.engines import probe

    probe.clear()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv1d(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
        td = TorchTwiceDifferentiable(model, torch.nn.functional.cross_entropy)
        x, y, v = torch.randn(16, 1, 6), torch.randint(0, 3, (16,)), torch.randn(4, td.num_params)
        assert len(bench.settle_auto(lambda: td.hvp(x, y, v), max_calls=1)) == 1
        seconds = bench.settle_auto(lambda: td.hvp(x, y, v), max_calls=32)
        assert 1 <= len(seconds) < 32 and all(s > 0 for s in seconds)
        assert not probe.unsettled("engine")
        entry = next(d for k, d in probe.choices().items() if k.startswith("engine: "))
        assert entry["source"] == "confirmed"
    finally:
        probe.clear()
