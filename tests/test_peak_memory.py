"""The memory budget bounds what a computation adds to the process, not one chunk of it: influence
factors by CG and by LiSSA on a model of a few million parameters, measured as peak RSS in a fresh
subprocess, stay under budget + the model's size + 1 GiB (torch's own working memory and the native
kernels' scratch, which the budget does not cover)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import twicediff
    from twicediff import TorchTwiceDifferentiable
    from twicediff.influence import compute_influence_factors

    method, budget = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    width = 1500  # P = 2,364,010
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10)).eval()
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    test = DataLoader(TensorDataset(x[:4], y[:4]), batch_size=4)
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    td.grad(x[:2], y[:2])  # torch's lazily loaded kernels belong to the base, not to the call
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    twicediff.set_memory_budget(budget)
    options = {"cg": dict(maxiter=2, rtol=0.0, atol=0.0), "lissa": dict(maxiter=2, on_failure="warn")}[method]
    compute_influence_factors(td, train, test, method, hessian_perturbation=0.1, **options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"P": td.num_params, "model": 4 * td.num_params, "base": base, "peak": peak}))
""")


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_influence_factors_peak_rss_within_budget(method):
    budget = 512 * 2**20
    import twicediff

    # the subprocess imports the twicediff this test imports (the source tree or the installed one)
    env_path = os.path.dirname(os.path.dirname(os.path.abspath(twicediff.__file__)))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, method, str(budget)], capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    added = out["peak"] - out["base"]
    assert added <= budget + out["model"] + 2**30, (method, out, added)
