"""Progress bars tell the truth: an iterative solver that stops early shows a count, not a bar stuck
at a few percent of maxiter; every bar is closed when its work ends (an open bar garbles the next);
bars opened inside another (a solver's inside an influence function's) are cleared when done."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import TorchTwiceDifferentiable
from twicediff.influence import compute_self_influences
from twicediff.inversion import solve_hvp


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    return TorchTwiceDifferentiable(model, F.cross_entropy), DataLoader(TensorDataset(x, y), batch_size=8)


def _open_bars():
    from tqdm.auto import tqdm

    return [b for b in list(getattr(tqdm, "_instances", ())) if not b.disable]


@pytest.mark.parametrize("method, kwargs, name", [
    ("cg", {"block_krylov": False}, "cg"), ("cg", {}, "block cg"),
    ("arnoldi", {"rank_estimate": 3}, "lanczos"),
    ("lissa", {"scale": 20.0, "rtol": 1e-2, "maxiter": 2000, "on_failure": "warn"}, "lissa")])
def test_iterative_solver_bars_count_without_a_total_and_close(capsys, method, kwargs, name):
    td, loader = _problem()
    solve_hvp(method, td, loader, torch.randn(2, td.num_params), hessian_perturbation=0.5, progress=True, **kwargs)
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(name + ":")]
    assert lines, err
    # a count ("cg: 7it [...]"), never a percentage of maxiter
    assert not any("%|" in line for line in lines), lines[-1]
    assert not _open_bars()


def test_nested_bars_are_cleared_and_closed(capsys):
    td, loader = _problem()
    compute_self_influences(td, loader, hessian_regularization=0.5, inversion_method="cg", progress=True)
    err = capsys.readouterr().err
    assert not _open_bars()
    lines = [line.replace("\x1b[A", "") for line in re.split(r"[\r\n]", err)]
    inner = [i for i, line in enumerate(lines) if line.startswith("block cg")]
    assert inner, err
    assert not any("%|" in lines[i] for i in inner), lines[inner[-1]]  # no total of maxiter
    # the solver's bar ran inside the bar over batches: tqdm cleared it (a line of spaces) when it
    # closed, before the outer bar went on
    after = lines[inner[-1] + 1:]
    first = next(line for line in after if line and not line.startswith("block cg"))
    assert first.strip() == "", after
