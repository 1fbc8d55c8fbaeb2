"""twicediff.bench: the rows, the table, the plot and the JSON, on a tiny preset (no timing asserts)."""
import json

import pytest
import torch
from torch import nn

from twicediff import TorchTwiceDifferentiable, bench


@pytest.fixture
def tiny_preset(monkeypatch):
    presets = dict(bench.PRESETS)
    presets["tiny"] = ("MLP 4-6-3 Tanh, N=8", lambda device: bench.make_mlp([4, 6, 3], nn.Tanh, 8, device=device))
    monkeypatch.setattr(bench, "PRESETS", presets)
    return "tiny"


def test_run_rows_table_plot_json(tiny_preset, tmp_path):
    rows = bench.run(tiny_preset, directions=(1, 2, bench.BUDGET_DIRECTIONS), repeats=1, memory=False)
    methods = {(r["D"], r["method"]) for r in rows}
    for D in (1, 2, bench.BUDGET_DIRECTIONS):
        assert {(D, m) for m in ("func", "autograd", "loop", "vmap_jvp_grad", "grad")} <= methods
    assert (bench.BUDGET_DIRECTIONS, f"auto@{bench.BUDGET_BYTES}") in methods and (2, "auto") not in methods
    for r in rows:
        if r["method"] == "loop":
            assert r["vs_loop"] == pytest.approx(1.0)
        if r["method"] == "grad":
            assert r["hvps_per_s"] is None
        else:
            assert r["hvps_per_s"] > 0 and r["hvp_in_grads"] > 0
    table = bench.format_table(rows)
    assert table.count("\n| tiny |") == len(rows) and "Budget check (tiny" in table
    bench.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.to_json(rows, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == rows


def test_methods_compute_the_same_products(tiny_preset):
    td, x, y = bench._setup(tiny_preset, "cpu")
    td = TorchTwiceDifferentiable(td.model.double(), td.loss)
    x = x.double()
    v = bench._directions(td, 3, x)
    expected = td.hvp(x, y, v, engine="autograd")
    for method in ("func", "loop", "vmap_jvp_grad", "auto", f"auto@{bench.BUDGET_BYTES}"):
        torch.testing.assert_close(bench._method_call(method, td, x, y, v)(), expected, rtol=1e-10, atol=1e-12)


def test_peak_memory_in_process(tiny_preset):
    peak = bench.measure_peak(tiny_preset, "cpu", "func", 4, None)
    assert peak["peak_mb"] > 0 and peak["extra_mb"] >= 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset must be one of"):
        bench.run("zz")
    with pytest.raises(ValueError, match="engines must be a subset"):
        bench.run("a", engines=["fast"])
    with pytest.raises(ValueError, match="directions must be positive"):
        bench.run("a", directions=(0,))
