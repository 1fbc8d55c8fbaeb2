"""pyDVL 0.7.1's side of bench_influence.py, run in the pyDVL venv (benchmarks/.venv-pydvl, made by
setup_pydvl_venv.sh), which has no twicediff. Also holds the benchmark's model definition, which
bench_influence.py imports so both sides build the same network.

    python pydvl_influence_runner.py INPUTS.pt METHOD OUT.pt

INPUTS.pt (written by bench_influence.py): the model's state_dict, train_x/train_y, test_x/test_y,
lam, batch_size, solver options and threads. Runs pyDVL's compute_influences (Up) once on a small
slice to warm up, then once timed (wall and process CPU time); saves the influences to OUT.pt and prints one JSON line.
"""
import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_mlp() -> nn.Module:
    """MLP 64-64-10 with Tanh: P = 64·64 + 64 + 64·10 + 10 = 4,810 parameters."""
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def main(inputs_path: str, method: str, out_path: str) -> None:
    import pydvl
    from pydvl.influence import InversionMethod, compute_influences
    from pydvl.influence.torch import TorchTwiceDifferentiable

    inputs = torch.load(inputs_path)
    torch.set_num_threads(inputs["threads"])
    model = build_mlp()
    model.load_state_dict(inputs["state_dict"])
    model.eval()
    wrapped = TorchTwiceDifferentiable(model, nn.functional.cross_entropy)
    bs = inputs["batch_size"]
    kwargs = inputs["solver_options"][method]

    def run(train_x, train_y, test_x, test_y):
        train = DataLoader(TensorDataset(train_x, train_y), batch_size=bs)
        test = DataLoader(TensorDataset(test_x, test_y), batch_size=bs)
        return compute_influences(wrapped, train, test_data=test, input_data=train,
                                  inversion_method=InversionMethod(method), hessian_regularization=inputs["lam"],
                                  **kwargs)

    run(inputs["train_x"][:16], inputs["train_y"][:16], inputs["test_x"][:2], inputs["test_y"][:2])
    start, start_cpu = time.perf_counter(), time.process_time()
    values = run(inputs["train_x"], inputs["train_y"], inputs["test_x"], inputs["test_y"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    torch.save(values.detach(), out_path)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "pydvl": pydvl.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
