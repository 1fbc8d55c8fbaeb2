"""Runs pyDVL 0.7.1 on the inputs saved by bench_solvers.py and prints one JSON line of timings.

Run with the pyDVL venv's interpreter (benchmarks/.venv-pydvl, made by setup_pydvl_venv.sh):
    python pydvl_solvers_runner.py INPUTS.pt OUTPUT.pt {cg,eigsh}
It times pyDVL's solve_hvp(InversionMethod.Cg, ...) on all right-hand sides and pyDVL's
model_hessian_low_rank (scipy eigsh, default ncv) for the top eigenpairs of H + λI, and saves
their results to OUTPUT.pt for bench_solvers.py to compare.
"""
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pydvl.influence.inversion import InversionMethod, solve_hvp
from pydvl.influence.torch import TorchTwiceDifferentiable
from pydvl.influence.torch.torch_differentiable import model_hessian_low_rank


def main(inputs_path: str, output_path: str, task: str) -> None:
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    data = torch.load(inputs_path)
    model = nn.Sequential(*[eval(m) for m in data["layers"]])  # noqa: S307 (our own layer list)
    model.load_state_dict(data["state_dict"])
    model.eval()
    td = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=data["batch_size"])
    b, lam = data["b"], data["hessian_perturbation"]

    if task == "cg":
        t = time.perf_counter()
        cg = solve_hvp(InversionMethod.Cg, td, loader, b, hessian_perturbation=lam, rtol=data["rtol"],
                       atol=data["atol"])
        seconds = time.perf_counter() - t
        torch.save({"cg_x": cg.x.detach()}, output_path)
        print(json.dumps({"seconds": seconds,
                          "cg_optimal": [bool(cg.info[f"batch_{i}"]["optimal"]) for i in range(b.shape[0])],
                          "cg_niter": [int(cg.info[f"batch_{i}"]["niter"]) for i in range(b.shape[0])]}))
    else:
        t = time.perf_counter()
        low_rank = model_hessian_low_rank(td, loader, hessian_perturbation=lam, rank_estimate=data["rank"],
                                          tol=data["eig_tol"])
        seconds = time.perf_counter() - t
        torch.save({"eigen_vals": low_rank.eigen_vals}, output_path)
        print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
