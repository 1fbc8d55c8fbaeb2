"""``engine="auto"``: the measured choice among the engines. What is checked is behaviour — the
probe runs once per shape class and is then reused, overrides win, the decision is reported, the
deterministic rule stands in where timing is off, the probe's work is bounded in calls — and that
whatever engine it picks gives products equal to float64 references. Nothing here asserts a time."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from generated_models import generate_conv_attention, reference_hessian
from twicediff import TorchTwiceDifferentiable
from twicediff.app.cli import device_facts
from twicediff.torch.engines import auto, probe
from twicediff.torch.engines.amortise import expected_products
from twicediff.torch.engines.auto import AutoEngine, default_engine


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("TWICEDIFF_ENGINE", raising=False)
    monkeypatch.delenv("TWICEDIFF_PROBE", raising=False)
    monkeypatch.delenv("TWICEDIFF_PROBE_CACHE", raising=False)
    probe.clear()
    yield
    probe.clear()


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    return TorchTwiceDifferentiable(model, F.cross_entropy), torch.randn(9, 5, dtype=torch.float64), \
        torch.randint(0, 3, (9,))


def _structured(seed=2):
    case = generate_conv_attention(seed)
    return case, TorchTwiceDifferentiable(case.model, case.loss)


def _engine_keys():
    return {k: v for k, v in twicediff.build_info()["probe"].items() if k.startswith("engine: ")}


def _counting(monkeypatch):
    """Counts of AutoEngine._measure calls (one per probe) and of each candidate's calls."""
    counts = {"probes": 0}
    measure, run = AutoEngine._measure, AutoEngine._run

    def counted_measure(self, *a, **k):
        counts["probes"] += 1
        return measure(self, *a, **k)

    def counted_run(self, name, *a, **k):
        counts[name] = counts.get(name, 0) + 1
        return run(self, name, *a, **k)
    monkeypatch.setattr(AutoEngine, "_measure", counted_measure)
    monkeypatch.setattr(AutoEngine, "_run", counted_run)
    return counts


def test_the_probe_runs_once_per_shape_class_and_is_reported(monkeypatch):
    counts = _counting(monkeypatch)
    case, td = _structured()
    V = torch.randn(6, td.num_params, dtype=td.dtype)
    first = td.hvp_function(case.x, case.y)
    first(V)
    assert counts["probes"] == 1
    assert first.engine.chosen in auto.CANDIDATES
    td.hvp_function(case.x, case.y)(V)  # same shape class: decided
    td.hvp_function(case.x, case.y)(V[:5])  # 5 directions round up to the same 8
    assert counts["probes"] == 1
    td.hvp_function(case.x, case.y)(V[:1])  # another number of directions: another class
    assert counts["probes"] == 2
    report = _engine_keys()
    assert len(report) == 2
    for key, entry in report.items():
        assert entry["source"] in ("probe", "revised", "confirmed"), (key, entry)  # revised: timed at size
        assert entry["choice"] in entry["seconds"], (key, entry)
        assert set(entry["seconds"]) == {"func", "autograd", "loop"}  # not native: a conv / attention model
    assert device_facts()["build"]["probe"] == twicediff.build_info()["probe"]


@pytest.mark.parametrize("which", ["native", "structured"])
@pytest.mark.parametrize("D", [1, 2, 7, 40])
def test_whatever_auto_picks_matches_float64(which, D):
    if which == "native":
        td, x, y = _mlp()
        from hessian_reference import explicit_hessian
        H = explicit_hessian(td.model, td.loss, x, y)
    else:
        case, td = _structured(D)
        x, y = case.x, case.y
        H = reference_hessian(case)
    V = torch.randn(D, td.num_params, dtype=torch.float64)
    product = td.hvp_function(x, y)
    got = product(V.to(td.dtype)).double()
    tol = 1e-9 if td.dtype == torch.float64 else 2e-4
    assert float((got - V @ H).abs().max()) <= tol * max(1.0, float((V @ H).abs().max())), product.engine.chosen
    if which == "native":
        assert "native" in next(iter(_engine_keys().values()))["seconds"]


@pytest.mark.parametrize("name", ["func", "autograd", "loop", "native"])
def test_engine_argument_and_environment_override_the_probe(monkeypatch, name):
    counts = _counting(monkeypatch)
    td, x, y = _mlp()
    V = torch.randn(4, td.num_params, dtype=td.dtype)
    assert td.hvp_function(x, y, engine=name).engine.name == name
    monkeypatch.setenv("TWICEDIFF_ENGINE", name)
    product = td.hvp_function(x, y)
    assert product.engine.name == name
    torch.testing.assert_close(product(V), td.hvp(x, y, V, engine="autograd"), rtol=1e-10, atol=1e-12)
    assert counts["probes"] == 0 and _engine_keys() == {}
    assert twicediff.build_info()["engine"] == name


def test_a_bad_environment_override_names_the_variable(monkeypatch):
    td, x, y = _mlp()
    monkeypatch.setenv("TWICEDIFF_ENGINE", "fastest")
    with pytest.raises(ValueError, match="TWICEDIFF_ENGINE.*'fastest'"):
        td.hvp(x, y, torch.randn(td.num_params, dtype=td.dtype))


def test_set_choice_overrides_the_measurement(monkeypatch):
    counts = _counting(monkeypatch)
    case, td = _structured()
    probe.set_choice("engine", "loop")
    product = td.hvp_function(case.x, case.y)
    product(torch.randn(3, td.num_params, dtype=td.dtype))
    assert product.engine.chosen == "loop" and counts["probes"] == 0
    assert twicediff.build_info()["probe"]["engine: *"] == {"choice": "loop", "source": "override"}


@pytest.mark.parametrize("D", [1, 5])
def test_without_timing_the_deterministic_rule_decides(monkeypatch, D):
    counts = _counting(monkeypatch)
    monkeypatch.setenv("TWICEDIFF_PROBE", "0")
    case, td = _structured()
    product = td.hvp_function(case.x, case.y)
    product(torch.randn(D, td.num_params, dtype=td.dtype))
    assert product.engine.chosen == default_engine(False, D) == ("loop" if D == 1 else "func")
    td2, x, y = _mlp()
    product = td2.hvp_function(x, y)
    product(torch.randn(D, td2.num_params, dtype=td2.dtype))
    assert product.engine.chosen == "native"
    assert counts["probes"] == 0 and _engine_keys() == {}


def test_the_probe_is_bounded_in_calls(monkeypatch):
    counts = _counting(monkeypatch)
    case, td = _structured()
    V = torch.randn(8, td.num_params, dtype=td.dtype)
    # No time to spend: the rule's engine runs its warm-up only, and is kept; the loop runs one
    # direction to check its product (engines/agreement.py).
    monkeypatch.setattr(auto, "PROBE_SECONDS", 0.0)
    product = td.hvp_function(case.x, case.y)
    product(V)
    assert product.engine.chosen == "func"
    assert counts == {"probes": 1, "func": 2, "loop": 1}  # the warm-up, the product itself, the check
    # Unlimited time: a warm-up on one direction, rounds on 2, 4, 8 directions, two more on 8.
    probe.clear()
    counts.clear()
    counts["probes"] = 0
    monkeypatch.setattr(auto, "PROBE_SECONDS", 1e9)
    product = td.hvp_function(case.x, case.y)
    product(V)
    chosen = product.engine.chosen
    assert {n: counts[n] - (n == chosen) for n in ("func", "autograd", "loop")} == {"func": 6, "autograd": 6, "loop": 6}


def test_a_candidate_that_fails_is_left_out():
    class Model(nn.Module):  # volumetric grid_sample has no forward-mode derivative: torch.func cannot take it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 16)

        def forward(self, x):
            grid = torch.full((x.shape[0], 1, 1, 1, 3), 0.3, dtype=x.dtype)
            return F.grid_sample(self.lin(x).reshape(-1, 2, 2, 2, 2), grid, align_corners=False).flatten(1)

    torch.manual_seed(0)
    td = TorchTwiceDifferentiable(Model().double().eval(), F.mse_loss)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    V = torch.randn(4, td.num_params, dtype=torch.float64)
    product = td.hvp_function(x, y)
    got = product(V)
    assert product.engine.chosen in ("autograd", "loop")
    entry = next(iter(_engine_keys().values()))
    assert entry["seconds"]["func"] == float("inf")
    torch.testing.assert_close(got, td.hvp(x, y, V, engine="autograd"), rtol=1e-10, atol=1e-12)


class _WrongJvp(torch.autograd.Function):
    """tanh with a right backward and a forward-mode rule off by half: what a wrong rule of torch's
    (such as its batching rule of cdist's derivative was) does to the func engine's product."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def jvp(ctx, t):
        x, = ctx.saved_tensors
        return 0.5 * t * (1 - torch.tanh(x) ** 2)


@pytest.mark.parametrize("budget", [auto.PROBE_SECONDS, 0.0])
def test_a_candidate_whose_product_is_not_the_loops_is_left_out(budget, caplog, monkeypatch):
    """The probe's warm-up products of one direction are compared with the loop's; func's, off
    through a wrong forward-mode rule, is left out with a warning, and auto gives the loop's
    products (engine='func' still gives its own). With no budget (a model whose one product takes
    longer than it) the loop runs one direction for the check all the same."""
    monkeypatch.setattr(auto, "PROBE_SECONDS", budget)
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(_WrongJvp.apply(self.a(x)))

    torch.manual_seed(0)
    td = TorchTwiceDifferentiable(Model().double().eval(), F.cross_entropy)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    V = torch.randn(4, td.num_params, dtype=torch.float64)
    want = td.hvp(x, y, V, engine="loop")
    assert float((td.hvp(x, y, V, engine="func") - want).abs().max()) > 1e-3  # the fault is there
    product = td.hvp_function(x, y)
    with caplog.at_level(logging.WARNING, logger="twicediff.torch.engines.agreement"):
        got = product(V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert product.engine.chosen != "func"
    assert next(iter(_engine_keys().values()))["seconds"]["func"] == float("inf")
    warnings = [r.getMessage() for r in caplog.records if "gave another product" in r.getMessage()]
    assert len(warnings) == 1 and "'func'" in warnings[0] and "Model" in warnings[0]


def test_expected_products_reach_the_engine_and_are_checked():
    case, td = _structured()
    assert td.hvp_function(case.x, case.y).engine.expected_products is None
    assert td.hvp_function(case.x, case.y, expected_products=500).engine.expected_products == 500
    with expected_products(10 ** 6):
        assert td.hvp_function(case.x, case.y).engine.expected_products == 10 ** 6
        assert td.hvp_function(case.x, case.y, expected_products=3).engine.expected_products == 3
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="hvp_function: expected_products must be None or an int >= 0"):
            td.hvp_function(case.x, case.y, expected_products=bad)
    # Without an expectation the compiled engine is never considered.
    td.hvp_function(case.x, case.y)(torch.randn(4, td.num_params, dtype=td.dtype))
    assert not any(k.startswith("compiled: ") for k in twicediff.build_info()["probe"])


@pytest.mark.parametrize("problem", ["tuple", "dict"])
def test_auto_on_tuple_and_dict_batches(problem):
    from structured_models import PROBLEMS, reference

    model, _, x, y = PROBLEMS[problem](10)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    V = torch.randn(5, td.num_params, dtype=td.dtype)
    product = td.hvp_function(x, y)
    torch.testing.assert_close(product(V), V @ reference(problem, 10)[1], rtol=1e-9, atol=1e-10)
    assert product.engine.chosen in ("func", "autograd", "loop")
    assert product.nbytes > 0


def test_the_prediction_from_timed_calls():
    """t(d) = a + b·d through the two largest timed calls, extrapolated at most 4 times beyond."""
    predicted = AutoEngine._predicted
    assert predicted({2: 0.03, 4: 0.04}, 4) == pytest.approx(0.01)             # measured there
    assert predicted({2: 0.03, 4: 0.04}, 16) == pytest.approx(0.02 / 16 + 0.005)
    assert predicted({2: 0.03, 4: 0.04}, 64) == predicted({2: 0.03, 4: 0.04}, 16)  # 4x at most
    assert predicted({1: 0.5, 2: 0.03, 4: 0.04}, 16) == predicted({2: 0.03, 4: 0.04}, 16)
    assert predicted({8: 0.08}, 64) == pytest.approx(0.01)                     # one size: its own rate
    assert predicted({2: 0.05, 4: 0.04}, 8) == pytest.approx(0.04 / 8)         # noise: no per-direction part
    assert predicted({2: 0.001, 4: 0.04}, 8) == pytest.approx(0.01)            # noise: no fixed part


def test_the_choice_is_confirmed_at_its_real_size(monkeypatch):
    """The probe's predictions are checked by timing the choice's own calls: a candidate predicted
    faster than (or within the margin of) the measured choice is taken and measured next; then the
    fastest measured stays. Predictions absurdly far from any real time make the outcome certain."""
    case, td = _structured()
    H = reference_hessian(case)
    V = torch.randn(8, td.num_params, dtype=td.dtype)
    predicted = {"func": 1e-12, "autograd": 2e-12, "loop": 1e3}  # seconds per direction
    monkeypatch.setattr(AutoEngine, "_measure", lambda self, names, *a: dict(predicted))
    key = lambda: next(iter(_engine_keys()))  # noqa: E731
    product = td.hvp_function(case.x, case.y)
    tol = 2e-4 if td.dtype == torch.float32 else 1e-9
    ran = []
    for call in range(8):
        got = product(V)
        ran.append(product.engine.chosen)
        assert float((got.double() - V.double() @ H).abs().max()) <= tol * max(1.0, float((V.double() @ H).abs().max()))
        entry = _engine_keys()[key()]
        assert set(entry["measured"]) == ({"func"} if call == 0 else {"func", "autograd"})
        if call == 0:
            assert entry["choice"] == "autograd" and entry["source"] == "revised"
        if entry["source"] == "confirmed":
            break
    # Both measured (up to three times each while within 1.5x of the fastest): the lower median
    # stays; the loop, predicted far slower, is never tried.
    assert ran[:2] == ["func", "autograd"] and len(ran) <= 6 and "loop" not in ran
    assert entry["source"] == "confirmed" and entry["seconds"]["loop"] == 1e3
    assert entry["choice"] == min(entry["measured"], key=entry["measured"].get)
    times = entry["times"]
    assert set(times) == {"func", "autograd"} and max(map(len, times.values())) <= 3
    assert sum(map(len, times.values())) == len(ran)
    assert all(entry["measured"][n] == pytest.approx(sorted(ts)[len(ts) // 2] if len(ts) % 2 else sum(ts) / 2)
               for n, ts in times.items())
    product(V)  # confirmed: no more timing, no more changes
    assert _engine_keys()[key()]["source"] == "confirmed"
    # A choice that measures no slower than every rival's figure is confirmed at once.
    probe.clear()
    predicted.update(func=1e-12, autograd=1e3, loop=1e3)
    td.hvp_function(case.x, case.y)(V)
    entry = _engine_keys()[key()]
    assert entry["choice"] == "func" and entry["source"] == "confirmed" and set(entry["measured"]) == {"func"}


def test_the_runner_up_is_timed_at_size_when_no_rival_is_within_the_margin(monkeypatch):
    """A prediction off by more than the 15% margin is caught by timing the runner-up once: with a
    clock that makes every call take 1 s, the choice measures 1/8 s per direction; the runner-up,
    predicted 1.6x that (outside the margin, inside 2x), is timed on the next call; the loop,
    predicted far slower, never is."""
    import types

    from twicediff.torch.engines import auto

    case, td = _structured()
    V = torch.randn(8, td.num_params, dtype=td.dtype)
    ticks = iter(range(10**6))
    clock = types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    monkeypatch.setattr(auto, "time", clock)
    monkeypatch.setattr(probe, "time", clock)  # auto's timed calls go through probe.timed_call
    predicted = {"func": 1e-6, "autograd": 0.2, "loop": 1e3}
    monkeypatch.setattr(AutoEngine, "_measure", lambda self, names, *a: dict(predicted))
    product = td.hvp_function(case.x, case.y)
    product(V)
    entry = next(iter(_engine_keys().values()))
    assert product.engine.chosen == "func" and entry["choice"] == "autograd" and entry["source"] == "revised"
    product(V)
    entry = next(iter(_engine_keys().values()))
    assert product.engine.chosen == "autograd" and entry["source"] == "revised"
    assert set(entry["measured"]) == {"func", "autograd"}
    # Both measured 1/8 s per direction: a tie, so each is timed three times, in turn, before the
    # choice is final.
    for again in ("func", "autograd", "func", "autograd"):
        product(V)
        assert product.engine.chosen == again
    entry = next(iter(_engine_keys().values()))
    assert entry["source"] == "confirmed" and {n: len(ts) for n, ts in entry["times"].items()} == {"func": 3, "autograd": 3}
    # beyond 2x the runner-up is not timed: the choice is confirmed at once
    probe.clear()
    predicted.update(autograd=0.3)
    td.hvp_function(case.x, case.y)(V)
    entry = next(iter(_engine_keys().values()))
    assert entry["choice"] == "func" and entry["source"] == "confirmed" and set(entry["measured"]) == {"func"}


def test_candidates_within_the_recheck_margin_are_compared_by_their_medians(monkeypatch):
    """One slow call must not decide between engines whose speeds are close: with a clock that each
    call advances by a set time, the loop takes 1 s per call and func 1.4 s (a slow moment), then
    0.7 s twice; timed three times each, in turn, func has the lower median and is the choice, where
    one call each would have kept the loop. An engine measured beyond 1.5x of the fastest is not
    timed again."""
    import types

    case, td = _structured()
    V = torch.randn(8, td.num_params, dtype=td.dtype)
    clock = [0.0]
    durations = {"loop": [1.0, 1.0, 1.0], "func": [1.4, 0.7, 0.7], "autograd": []}
    fake = types.SimpleNamespace(perf_counter=lambda: clock[0])
    monkeypatch.setattr(auto, "time", fake)
    monkeypatch.setattr(probe, "time", fake)  # auto's timed calls go through probe.timed_call
    run = AutoEngine._run

    def timed_run(self, name, *a, **k):
        clock[0] += durations[name].pop(0) if durations[name] else 0.0
        return run(self, name, *a, **k)
    monkeypatch.setattr(AutoEngine, "_run", timed_run)
    # Per direction: the loop predicted fastest, func within the runner-up margin of it.
    monkeypatch.setattr(AutoEngine, "_measure", lambda self, names, *a: {"loop": 1e-6, "func": 0.15, "autograd": 1e3})
    product = td.hvp_function(case.x, case.y)
    ran = []
    for _ in range(7):
        product(V)
        ran.append(product.engine.chosen)
    entry = next(iter(_engine_keys().values()))
    assert ran == ["loop", "func", "func", "loop", "func", "loop", "func"]
    assert entry["choice"] == "func" and entry["source"] == "confirmed"
    assert entry["times"] == {"loop": [pytest.approx(1 / 8)] * 3,
                              "func": [pytest.approx(1.4 / 8), pytest.approx(0.7 / 8), pytest.approx(0.7 / 8)]}
    assert entry["measured"] == {"loop": pytest.approx(1 / 8), "func": pytest.approx(0.7 / 8)}
    # A rival measured more than 1.5x slower is left at one call.
    probe.clear()
    durations.update(loop=[1.0], func=[1.6])
    product = td.hvp_function(case.x, case.y)
    product(V)
    product(V)
    entry = next(iter(_engine_keys().values()))
    assert entry["choice"] == "loop" and entry["source"] == "confirmed"
    assert {n: len(ts) for n, ts in entry["times"].items()} == {"loop": 1, "func": 1}


def test_the_probe_key_follows_the_model_as_it_changes_in_place():
    """The key auto's decisions are kept under names the model's structure. It is kept per model
    between calls, so it must follow what can change in place: train/eval flags, frozen
    parameters, a replaced module; and models built alike share it."""
    from twicediff.torch.engines.auto import _fingerprint

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval()

    model = build()
    first = _fingerprint(model, F.cross_entropy)
    assert _fingerprint(model, F.cross_entropy) == first == _fingerprint(build(), F.cross_entropy)
    assert _fingerprint(model, F.mse_loss) != first
    keys = {first}
    model.train()
    keys.add(_fingerprint(model, F.cross_entropy))
    model.eval()
    assert _fingerprint(model, F.cross_entropy) == first
    model[0].weight.requires_grad_(False)
    keys.add(_fingerprint(model, F.cross_entropy))
    model[0].weight.requires_grad_(True)
    model[1] = nn.ReLU()
    keys.add(_fingerprint(model, F.cross_entropy))
    model[1] = nn.Tanh()
    model[2] = nn.Linear(7, 4)
    keys.add(_fingerprint(model, F.cross_entropy))
    assert len(keys) == 5


def test_a_model_alike_but_not_native_does_not_reuse_a_native_choice():
    """Two models that print alike share a fingerprint, but a forward hook keeps the second from
    the native engine: auto used to hand it the first one's decision, "native", and fail with a
    KeyError. Its products must match autograd's."""
    td, x, y = _mlp()
    v = torch.randn(3, td.num_params, dtype=torch.float64)
    for _ in range(3):
        td.hvp(x, y, v)
    hooked = TorchTwiceDifferentiable(_mlp()[0].model, F.cross_entropy)
    hooked.model[0].register_forward_hook(lambda module, args, out: 2.0 * out)
    torch.testing.assert_close(hooked.hvp(x, y, v), hooked.hvp(x, y, v, engine="autograd"))
