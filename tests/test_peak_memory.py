"""The memory budget bounds the peak of a whole computation, not one chunk of it: influence factors of
8 test points by CG, LiSSA and Arnoldi on an MLP of 3.2M parameters under a 384 MiB budget, each in a
fresh process, add at most the budget plus a 32 MiB margin (allocator slack, oneDNN's kernels for
new GEMM shapes) to the process's peak resident set (VmHWM), and the whole process stays under
budget + the model's size + 1 GiB. Direct refuses the model with MemoryBudgetError before it
computes anything.

Before the solvers reserved all they hold, these runs went over the budget (the figures, and those
of a 21M-parameter MLP under 2 GiB, are in benchmarks/results/peak_memory_cpu.md)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

BUDGET = 384 * 2**20
MARGIN = 32 * 2**20

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import twicediff
    from twicediff import TorchTwiceDifferentiable
    from twicediff.influence import compute_influence_factors

    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    method, budget = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.Tanh(), nn.Linear(2048, 1024), nn.Tanh(),
                          nn.Linear(1024, 10)).eval()  # P = 3,159,050
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(72, 512, generator=g), torch.randint(0, 10, (72,), generator=g)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    test = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    options = {"cg": dict(maxiter=3, rtol=0.0, atol=0.0), "lissa": dict(maxiter=3, on_failure="warn"),
               "arnoldi": dict(rank_estimate=4, block_size=1, max_iter=8), "direct": {}}[method]
    # The same call on a tiny model first: what torch and twicediff import and load on first use
    # (torch.func's vmap, scipy, lazily loaded kernels) belongs to the process, not to the call.
    tiny = TorchTwiceDifferentiable(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval(), F.cross_entropy)
    tiny_data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    compute_influence_factors(tiny, tiny_data, tiny_data, method, hessian_perturbation=0.1,
                              **{**options, **({"rank_estimate": 2} if method == "arnoldi" else {})})
    base = peak_rss()
    twicediff.set_memory_budget(budget)
    error = ""
    try:
        factors = compute_influence_factors(td, train, test, method, hessian_perturbation=0.1, **options).x
        assert factors.shape == (8, td.num_params) and bool(torch.isfinite(factors).all())
    except twicediff.MemoryBudgetError as exc:
        error = str(exc)
    print(json.dumps({"P": td.num_params, "model": 4 * td.num_params, "base": base, "peak": peak_rss(),
                      "error": error}))
""")


def _peak(method):
    import twicediff

    # the subprocess imports the twicediff this test imports (the source tree or the installed one)
    env_path = os.path.dirname(os.path.dirname(os.path.abspath(twicediff.__file__)))
    # A fixed mmap threshold: glibc otherwise serves blocks of up to 32 MiB (rows of P = 3.2M)
    # from its heap once such blocks have been freed, and keeps their pages resident after they are
    # freed again, so the resident set would measure the allocator's cache, not what is held.
    env = {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, method, str(BUDGET)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["cg", "lissa", "arnoldi"])
def test_influence_factors_peak_rss_within_the_budget(method):
    out = _peak(method)
    assert not out["error"], out["error"]
    added = out["peak"] - out["base"]
    assert added <= BUDGET + MARGIN, (method, out, f"added {added / 2**20:.0f} MiB")
    assert out["peak"] <= BUDGET + out["model"] + 2**30, (method, out)


def test_direct_refuses_before_computing_anything():
    out = _peak("direct")
    assert "Direct factors the explicit [P, P] Hessian" in out["error"] and "P = 3,159,050" in out["error"]
    assert out["peak"] - out["base"] <= MARGIN, out  # not even the test gradients were computed
