"""Several Python threads computing HVPs at once, each for its own model, get exactly what a
single thread gets (no shared state between calls: engine caches, the budget, native buffers, and
torch's process-wide forward-AD levels, which broke the func engine before it took a lock)."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twicediff
from twicediff import TorchTwiceDifferentiable
from twicediff.app.bench import settle_auto
from twicediff.torch.engines import probe

THREADS = 4
ROUNDS = 100


def _run_threads(work, errors, mismatches):
    """Runs ``work(i)`` in THREADS threads at once; none may hang, raise or see another result."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert not mismatches, mismatches[:5]


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    width = 6 + seed  # different shapes per thread, so mixed-up buffers cannot go unnoticed
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    v = torch.randn(4, td.num_params, generator=g)
    return td, x, y, v


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_threads_released_together_match_single_threaded(engine):
    """"auto": the native engine where the model qualifies (it does, once built), else torch.func;
    "autograd": double backward vmapped over the directions (mvp)."""
    problems = [_problem(seed) for seed in range(THREADS)]
    if engine == "auto":  # until its choices are final auto's engine changes between calls, and
        for td, x, y, v in problems:  # the engines agree only up to rounding
            settle_auto(lambda: td.hvp(x, y, v))
    expected = [td.hvp(x, y, v, engine=engine) for td, x, y, v in problems]
    barrier = threading.Barrier(THREADS)
    mismatches, errors = [], []

    def work(i):
        td, x, y, v = problems[i]
        try:
            barrier.wait(timeout=60)
            for r in range(ROUNDS):
                out = td.hvp(x, y, v, engine=engine)
                if not torch.equal(out, expected[i]):
                    mismatches.append((i, r, (out - expected[i]).abs().max().item()))
        except Exception as exc:  # reported below, with the thread it happened in
            errors.append((i, repr(exc)))

    _run_threads(work, errors, mismatches)


def _shared_problem(native: bool):
    """One wrapped model (native, or one only the generic engines take) and its loaders."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    if native:
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
        x = torch.randn(40, 6)
    else:
        model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Flatten(), nn.Linear(12, 3)).eval()
        x = torch.randn(40, 1, 6)
    y = torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    return model, TorchTwiceDifferentiable(model, F.cross_entropy), loader


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["up", "perturbation"])
def test_threads_sharing_one_model_get_single_threaded_influences(native, kind):
    """compute_influences from several threads on ONE wrapped model: torch.func swaps a module's
    parameters while it runs, so unserialized calls corrupted each other's results and left
    functorch wrappers in the model (deepcopy then failed)."""
    import copy

    from twicediff.influence import compute_influences

    model, td, loader = _shared_problem(native)
    before = [p.detach().clone() for p in model.parameters()]

    def influences():
        return compute_influences(td, loader, test_data=loader, input_data=loader, inversion_method="direct",
                                  hessian_regularization=0.1, influence_type=kind)

    # auto times its choice, and rivals close to it, on the first calls at a size; the engines
    # agree only to rounding, so the reference is taken once the choice is confirmed.
    settle_auto(influences)
    expected = influences()
    barrier = threading.Barrier(THREADS)
    mismatches, errors = [], []

    def work(i):
        try:
            barrier.wait(timeout=60)
            for _ in range(3):
                out = influences()
                if not torch.allclose(out, expected, rtol=1e-5, atol=1e-7):
                    mismatches.append((i, (out - expected).abs().max().item()))
        except Exception as exc:  # reported below
            errors.append((i, repr(exc)[:300]))

    _run_threads(work, errors, mismatches)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    copy.deepcopy(model)



@pytest.mark.skipif(twicediff.build_info()["cpu_gemm"] != "onednn", reason="oneDNN takes no GEMM here: no choice to make")
def test_gemm_library_choice_stays_in_its_thread():
    """Sending the native op's GEMMs to ATen's BLAS (the probe's choice, here set with
    probe.set_choice) is a setting of the calling thread: threads doing it at once get their
    single-threaded results, and torch's own oneDNN switch, which other code reads, is never touched
    (it was toggled per call before, and concurrent calls switched each other back mid-call)."""
    problems = [_problem(seed) for seed in range(THREADS)]
    probe.set_choice("cpu_gemm", "blas")
    try:
        expected = [td.hvp(x, y, v, engine="native") for td, x, y, v in problems]
        barrier = threading.Barrier(THREADS + 1)
        mismatches, errors, flags = [], [], []

        def work(i):
            td, x, y, v = problems[i]
            try:
                barrier.wait(timeout=60)
                for r in range(ROUNDS):
                    out = td.hvp(x, y, v, engine="native")
                    if not torch.equal(out, expected[i]):
                        mismatches.append((i, r, (out - expected[i]).abs().max().item()))
            except Exception as exc:  # reported below, with the thread it happened in
                errors.append((i, repr(exc)))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        barrier.wait(timeout=60)
        while any(t.is_alive() for t in threads):
            flags.append(torch.backends.mkldnn.enabled)
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        assert not mismatches, mismatches[:5]
        assert all(flags), f"torch.backends.mkldnn.enabled was False in {flags.count(False)} of {len(flags)} looks"
    finally:
        probe.set_choice("cpu_gemm", None)


def test_threads_on_attention_models_leave_the_fast_path_setting_as_it_was():
    """Each call switches torch's MHA fast path off while it runs (guard.attention_for_derivatives);
    calls overlapping in several threads must not leave it off, nor get other results."""
    models = []
    for seed in range(THREADS):
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        module = nn.Sequential(layer, nn.Flatten(), nn.Linear(24, 3)).double().eval()
        td = TorchTwiceDifferentiable(module, F.cross_entropy)
        x, y = torch.randn(4, 3, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
        v = torch.randn(2, td.num_params, dtype=torch.float64)
        models.append((td, x, y, v, td.hvp(x, y, v, engine="func")))
    errors, mismatches = [], []

    def work(i):
        td, x, y, v, want = models[i]
        try:
            for _ in range(10):
                got = td.hvp(x, y, v, engine="func")
                if not torch.equal(got, want):
                    mismatches.append(i)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            errors.append(repr(exc))

    _run_threads(work, errors, mismatches)
    assert torch.backends.mha.get_fastpath_enabled()
