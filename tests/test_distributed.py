"""Distributed twicediff under the DDP convention, with real processes: 2 and 3 gloo ranks (3 with
uneven shards) started here with a free port, each computing on its shard
(tests/distributed_worker.py); every quantity must equal one process's on the concatenated data
(float64 to 1e-10, float32 to 1e-5, relative), be the same on every rank, and every failure case
must raise on every rank within the time limit. Three process starts in all: the 2-rank run also
holds the failure cases and float32."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import twicediff
from twicediff import TorchTwiceDifferentiable, distributed as tdist

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 240
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, world: int, tmp_path) -> list:
    """Runs ``world`` worker processes to the end (or kills them at TIMEOUT_S) and returns each
    rank's saved results; fails with the ranks' output when one does not finish cleanly."""
    # The workers import the same twicediff as this test (source tree or installed), one thread each.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(twicediff.__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    port = _free_port()
    script = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    procs = [subprocess.Popen([sys.executable, script, scenario, str(r), str(world), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for r in range(world)]
    outputs, timed_out = [], False
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                q.kill()
            outputs.append(p.communicate()[0].decode(errors="replace"))
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{out[-4000:]}"
                         for r, (p, out) in enumerate(zip(procs, outputs)))
        pytest.fail(f"{scenario} with {world} ranks: {'timed out' if timed_out else f'ranks {failed} failed'}\n{logs}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _reference(world: int) -> dict:
    """The same quantities with one process on the concatenated data (no process group here)."""
    assert tdist.current_group() is None
    results = {}
    for dtype in worker.dtypes(world):
        x, y, xt, yt = worker.make_data(dtype)
        model = TorchTwiceDifferentiable(worker.make_model(dtype), F.cross_entropy)
        loader = DataLoader(TensorDataset(x, y), batch_size=worker.BATCH)
        res = worker.compute(model, worker.batches(x, y, 0, worker.N_TRAIN),
                             worker.lissa_reference_batches(x, y, world), worker.batches(xt, yt, 0, worker.N_TEST),
                             loader)
        res.update(worker.dict_results(dtype, 0, worker.N_TRAIN))
        results.update({f"{k}/{str(dtype)[6:]}": v for k, v in res.items()})
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One run of 2 ranks for the comparisons and the failure cases (a process start costs more than
    everything the ranks compute)."""
    return _spawn("compute+failures", 2, tmp_path_factory.mktemp("two_ranks"))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_one_process_on_the_concatenated_data(world, two_ranks, tmp_path):
    ranks = [r["compute"] for r in (two_ranks if world == 2 else _spawn("compute", world, tmp_path))]
    ref = _reference(world)
    for key, expected in ref.items():
        if key.startswith(("cg_info", "grads_untouched")) or "_only" in key:
            continue
        tol = TOLERANCE[key.split("/")[1]]
        for r, got in enumerate(ranks):
            assert got[key].shape == expected.shape, (key, r)
            assert _rel(got[key], expected) <= tol, (key, r, _rel(got[key], expected))
            # every rank holds the same bits
            assert torch.equal(got[key], ranks[0][key]), (key, r)
    for r, got in enumerate(ranks):
        assert repr(got["cg_info/float64"]) == repr(ranks[0]["cg_info/float64"])
        assert bool(got["grads_untouched/float64"]), "a .grad was written"
        assert torch.equal(got["lissa_sampler_only/float64"], ranks[0]["lissa_sampler_only/float64"])
        assert bool(torch.isfinite(got["lissa_sampler_only/float64"]).all())
        assert torch.equal(got["arpack_only/float64"], ranks[0]["arpack_only/float64"])
        assert _rel(got["arpack_only/float64"], got["arnoldi/float64"]) <= 1e-5
        assert torch.equal(got["arnoldi_auto_only/float64"], ranks[0]["arnoldi_auto_only/float64"])
        assert _rel(got["arnoldi_auto_only/float64"], got["arnoldi/float64"]) <= 1e-5
    n = worker.N_TRAIN
    assert ranks[0]["influences_all/float64"].shape == (n, n)
    assert ranks[0]["influences_sampler/float64"].shape == (worker.N_TEST, n)
    assert ranks[0]["self_influences/float64"].shape == (n,)
    assert ranks[0]["dict_influences_all/float64"].shape == (n, n)  # dict batches: x = {"u", "w", "scale"}


def test_failures_raise_on_every_rank(two_ranks):
    for r, cases in enumerate(rank["failures"] for rank in two_ranks):
        msg = cases["model_raises"]
        assert msg.startswith("DistributedError") and "rank 1 of 2" in msg and "mean_hessian" in msg, (r, msg)
        assert "takes 3 features" in msg, msg
        msg = cases["data_raises_in_cg"]
        assert msg.startswith("DistributedError") and "rank 1 of 2" in msg and "shard 1 is corrupt" in msg, (r, msg)
        msg = cases["data_raises_in_lissa"]
        assert msg.startswith("DistributedError") and "rank 0 of 2" in msg and "out of disk" in msg, (r, msg)
        msg = cases["P"]
        assert msg.startswith("ValueError") and "P (number of trainable parameters): 38 on rank 0; 45 on rank 1" \
            in msg, (r, msg)
        msg = cases["dtype"]
        assert msg.startswith("ValueError") and "dtype: 'torch.float64' on rank 0; 'torch.float32' on rank 1" \
            in msg, (r, msg)
        msg = cases["method"]
        assert msg.startswith("ValueError") and "inversion_method: 'cg' on rank 0; 'direct' on rank 1" in msg, (r, msg)
        msg = cases["options"]
        assert msg.startswith("ValueError") and "options" in msg and "rtol" in msg, (r, msg)
        msg = cases["rhs"]
        assert msg.startswith("DistributedError") and "b differs from rank 0's" in msg and "rank 1 of 2" in msg, \
            (r, msg)
        msg = cases["diverged"]
        assert msg.startswith("DistributedError") and "the ranks' blocks differ (rank 0 against rank 1)" in msg, \
            (r, msg)
        msg = cases["empty_shard"]
        assert msg.startswith("DistributedError") and "rank 1 of 2" in msg and "must not be empty" in msg, (r, msg)
        msg = cases["fsdp"]
        assert msg.startswith("TypeError") and "sharded with FSDP" in msg, (r, msg)
        msg = cases["parameters"]
        assert msg.startswith("ValueError") and "parameter values (fingerprint)" in msg, (r, msg)
        msg = cases["gather_over_budget"]
        assert msg.startswith("MemoryBudgetError") and "save_columns" in msg and "[40, 23]" in msg, (r, msg)
        assert torch.equal(cases["from_files"], cases["gathered"])
        assert cases["from_files"].shape == (worker.N_TEST, worker.N_TRAIN)
        assert torch.equal(cases["after"], two_ranks[0]["failures"]["after"])
        assert torch.equal(cases["subgroup"], cases["after"])
        x, y, _, _ = worker.make_data(torch.float64)
        own = TorchTwiceDifferentiable(worker.make_model(torch.float64), F.cross_entropy).mean_hessian(
            worker.batches(x, y, *worker.shard_bounds(2)[r]))
        assert _rel(cases["local"], own) <= 1e-12 and _rel(cases["local"], cases["after"]) > 1e-3


def test_one_process_without_a_group_is_local():
    assert tdist.current_group() is None
    with tdist.local_only():
        assert tdist.current_group() is None
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    assert tdist.unwrap_model(model) is model
    assert TorchTwiceDifferentiable(nn.DataParallel(model), F.mse_loss).model is model
    with pytest.raises(TypeError, match="ProcessGroup"):
        with tdist.use_process_group(None):
            pass
