"""The timed probe behind measured choices: decisions from given timings, caching, overrides, the
disk cache, its bounded cost (counted in calls), and the native op giving the same products on
either GEMM library."""
import copy
import io
import time

import pytest
import torch
from torch import nn

import twicediff
from twicediff.torch import TorchTwiceDifferentiable
from twicediff.torch.engines import probe


@pytest.fixture(autouse=True)
def fresh():
    probe.clear()
    yield
    probe.clear()


def counting(names, sleep=0.0):
    calls = {n: 0 for n in names}

    def make(n):
        def call():
            calls[n] += 1
            if sleep:
                time.sleep(sleep)
        return call
    return calls, {n: make(n) for n in names}


def test_given_timings_pick_the_fastest_and_the_choice_is_kept():
    calls, cands = counting(["a", "b", "c"])
    assert probe.choose("k", "shape1", cands, timings={"a": 3.0, "b": 1.0, "c": 2.0}) == "b"
    assert calls == {"a": 0, "b": 0, "c": 0}
    # Kept for the process: other timings for the same shape class change nothing.
    assert probe.choose("k", "shape1", cands, timings={"a": 0.1, "b": 1.0, "c": 2.0}) == "b"
    assert probe.choose("k", "shape2", cands, timings={"a": 0.1, "b": 1.0, "c": 2.0}) == "a"
    report = probe.choices()
    assert report["k: shape1"]["choice"] == "b" and report["k: shape1"]["source"] == "given"
    assert twicediff.build_info()["probe"]["k: shape2"]["choice"] == "a"
    # Ties go to the first candidate.
    assert probe.choose("k", "tie", cands, timings={"a": 1.0, "b": 1.0, "c": 1.0}) == "a"
    with pytest.raises(ValueError, match="missing"):
        probe.choose("k", "bad", cands, timings={"a": 1.0})


def test_candidates_by_name_where_the_caller_measures():
    measured = []
    assert probe.choose("k", "names", ["a", "b"], measure=lambda: measured.append(1) or {"a": 2.0, "b": 1.0}) == "b"
    assert measured == [1] and probe.choices()["k: names"]["seconds"] == {"a": 2.0, "b": 1.0}
    assert probe.choose("k", "given", ("a", "b"), timings={"a": 1.0, "b": 2.0}) == "a"
    with pytest.raises(TypeError, match="candidates must map names to calls when neither timings nor measure"):
        probe.choose("k", "unmeasured", ["a", "b"])


def test_override_wins_and_is_checked():
    calls, cands = counting(["a", "b"])
    probe.set_choice("k", "b")
    assert probe.choose("k", "s", cands, timings={"a": 0.0, "b": 9.0}) == "b"
    assert probe.choices()["k: *"] == {"choice": "b", "source": "override"}
    probe.set_choice("k", "zzz")
    with pytest.raises(ValueError, match="override"):
        probe.choose("k", "s", cands)
    probe.set_choice("k", None)
    assert probe.choose("k", "s", cands, timings={"a": 0.0, "b": 9.0}) == "a"


def test_probe_cost_is_bounded_in_calls():
    # Each call is slower than the probe's budget: a warm-up call and one timed call each.
    calls, cands = counting(["a", "b"], sleep=0.05)
    probe.choose("k", "slow", cands, max_seconds=0.05)
    assert calls == {"a": 2, "b": 2}
    # Fast calls: the warm-up plus at most MAX_ROUNDS timed rounds.
    calls, cands = counting(["a", "b"])
    probe.choose("k", "fast", cands)
    assert calls["a"] == calls["b"] == 1 + probe.MAX_ROUNDS


def test_a_probe_inside_a_candidate_is_not_that_candidate_s_time():
    """A candidate whose calls each start a probe of their own (the native engine's first call of a
    GEMM shape class, inside auto's timing of the engines) is timed without that probe's calls:
    here "a" costs nothing itself and each call runs an inner probe of 4 × 10 ms or more; "b" sleeps
    5 ms. Counting the inner probes, "a" would look 8 times slower than "b"."""
    calls, inner = counting(["x", "y"], sleep=0.01)
    fresh_keys = iter(range(10**6))

    def a():
        probe.choose("inner", f"shape class {next(fresh_keys)}", inner, max_seconds=0.0)

    assert probe.choose("outer", "k", {"a": a, "b": lambda: time.sleep(0.005)}) == "a"
    assert calls["x"] >= 4  # the inner probes ran
    _, seconds = probe.timed_call(a)
    assert seconds < 0.005  # about a's own overhead (the inner probe alone sleeps 40 ms)


def test_disk_cache_survives_the_process_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWICEDIFF_PROBE_CACHE", str(tmp_path / "probe.json"))
    calls, cands = counting(["a", "b"])
    first = probe.choose("k", "s", cands)
    n = dict(calls)
    probe.clear()
    assert probe.choose("k", "s", cands) == first
    assert calls == n and probe.choices()["k: s"]["source"] == "disk"
    (tmp_path / "probe.json").write_text("not json")
    probe.clear()
    assert probe.choose("k", "s", cands, timings={"a": 1.0, "b": 0.5}) == "b"


def _cpuinfo(family):
    """probe's ``open``, with /proc/cpuinfo that of a two-CPU "AMD EPYC" of this family."""
    text = (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 2\n"
            f"model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\n")
    real_open = open
    return lambda path, *a, **k: io.StringIO(text) if path == "/proc/cpuinfo" else real_open(path, *a, **k)


def test_a_disk_choice_is_not_reused_on_another_cpu_generation(tmp_path, monkeypatch):
    """Virtual machines name Zen 4 and Zen 5 alike ("AMD EPYC", both AVX-512): the family tells
    them apart, so a choice timed on one is not taken as the other's."""
    monkeypatch.setenv("TWICEDIFF_PROBE_CACHE", str(tmp_path / "probe.json"))
    monkeypatch.setattr(probe, "open", _cpuinfo(25), raising=False)
    assert probe.cpu_model() == "AMD EPYC (family 25, model 2)"  # the first CPU's block
    probe.clear()
    assert probe.choose("k", "s", {"a": lambda: time.sleep(0.02), "b": lambda: None}) == "b"  # probed, stored
    probe.clear()
    assert probe.choose("k", "s", counting(["a", "b"])[1]) == "b"
    assert probe.choices()["k: s"]["source"] == "disk"  # same generation: the stored choice
    monkeypatch.setattr(probe, "open", _cpuinfo(26), raising=False)
    probe.clear()
    probe.choose("k", "s", counting(["a", "b"])[1])
    assert probe.choices()["k: s"]["source"] == "probe"  # timed afresh


@pytest.mark.parametrize("backend", ["onednn", "blas"])
def test_native_products_on_either_gemm_library_match_float64(backend):
    if twicediff.build_info()["cpu_gemm"] != "onednn":
        pytest.skip("oneDNN is not available to the native op here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7)).eval()
    x, y = torch.randn(29, 13), torch.randint(0, 7, (29,))
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    v = torch.randn(6, td.num_params)
    probe.set_choice("cpu_gemm", backend)
    got = td.hvp(x, y, v)
    # float64 reference: forward-over-reverse of the flattened loss in plain torch.func.
    m64 = copy.deepcopy(model).double()
    names = [n for n, _ in m64.named_parameters()]
    shapes = [p.shape for _, p in m64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(m64, params, (x.double(),)), y)

    want = torch.stack([torch.func.jvp(torch.func.grad(loss), (flat,), (d,))[1] for d in v.double()])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert any(k.startswith("cpu_gemm") for k in twicediff.build_info()["probe"])


def test_a_probed_decision_stays_unsettled_until_revised_as_final():
    """unsettled: a decision this process's probe made may still be revised until its caller
    confirms it; one given timings is final from the start. decisions lists one kind's."""
    probe.choose("k", "probed", ["a", "b"], measure=lambda: {"a": 1.0, "b": 2.0})
    probe.choose("k", "given", ["a", "b"], timings={"a": 1.0, "b": 2.0})
    probe.choose("other", "x", ["a"], timings={"a": 1.0})
    assert set(probe.decisions("k")) == {"probed", "given"}
    assert probe.unsettled("k") and probe.unsettled("k", "probed") and not probe.unsettled("k", "given")
    probe.revise("k", "probed", "b", {"b": 0.5}, final=False)
    assert probe.unsettled("k", "probed") and probe.decisions("k")["probed"]["choice"] == "b"
    probe.revise("k", "probed", "b", {"a": 1.0, "b": 0.5}, final=True)
    assert not probe.unsettled("k") and not probe.unsettled("other")
