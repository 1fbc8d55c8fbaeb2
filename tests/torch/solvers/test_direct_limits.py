"""Direct keeps its promises at its limits: a P too large for the explicit Hessian is refused before
anything is allocated, a singular H + λI raises, and half-precision models are solved in float32."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from twicediff import MemoryBudgetError, TorchTwiceDifferentiable
from twicediff.influence import compute_influences, compute_self_influences
from twicediff.inversion import solve_hvp


def test_large_p_raises_memory_budget_error_naming_p_bytes_and_alternatives():
    model = nn.Linear(5000, 4000).eval()  # P ≈ 2e7: the Hessian alone would be 1.6 PB in float32
    td = TorchTwiceDifferentiable(model, F.mse_loss)
    x, y = torch.randn(2, 5000), torch.randn(2, 4000)
    with pytest.raises(MemoryBudgetError) as err:
        solve_hvp("direct", td, [(x, y)], torch.zeros(td.num_params))
    message = str(err.value)
    assert f"P = {td.num_params:,}" in message and "bytes" in message
    assert "'cg'" in message and "'arnoldi'" in message and "EK-FAC" in message


@pytest.mark.parametrize("kind", ["collinear_features", "cross_entropy"])
def test_singular_system_raises_runtime_error(kind):
    """H singular: a feature that is a multiple of another (least squares), or cross-entropy's
    invariance to a constant added to every logit. With λ = 0 the old solve returned an x whose
    residual was from half to hundreds of times ‖b‖, with at most an INFO log."""
    torch.manual_seed(0)
    if kind == "collinear_features":
        x = torch.randn(20, 2, dtype=torch.float64)
        x = torch.cat([x, 3 * x[:, 1:]], dim=1)
        y = torch.randn(20, dtype=torch.float64)
        td = TorchTwiceDifferentiable(nn.Linear(3, 1).double(), F.mse_loss)
    else:
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
        td = TorchTwiceDifferentiable(model, F.cross_entropy)
    b = torch.randn(2, td.num_params, dtype=td.dtype)
    advice = r"increase λ \(hessian_perturbation; hessian_regularization in compute_influences\) \(now 0.0\)"
    with pytest.raises(RuntimeError, match=r"singular.*" + advice):
        solve_hvp("direct", td, [(x, y)], b)
    assert torch.isfinite(solve_hvp("direct", td, [(x, y)], b, hessian_perturbation=0.1).x).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_solved_in_float32(dtype):
    """They failed with errors about internal ops (cholesky_cpu not implemented for BFloat16)."""
    import copy

    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval().to(dtype)
    single = copy.deepcopy(half).float()  # the same (rounded) weights in float32
    x, y = torch.randn(12, 4).to(dtype), torch.randint(0, 2, (12,))
    td = TorchTwiceDifferentiable(half, F.cross_entropy)
    td32 = TorchTwiceDifferentiable(single, F.cross_entropy)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    b = torch.randn(2, td.num_params).to(dtype)
    sol = solve_hvp("direct", td, loader, b, hessian_perturbation=0.5).x
    assert sol.dtype == dtype
    ref = solve_hvp("direct", td32, DataLoader(TensorDataset(x.float(), y), batch_size=6), b.float(),
                    hessian_perturbation=0.5).x
    assert float((sol.float() - ref).norm() / ref.norm()) < 0.1
    selfs = compute_self_influences(td, loader, hessian_regularization=0.5)
    assert selfs.shape == (12,) and torch.isfinite(selfs.float()).all()
    assert torch.isfinite(compute_influences(td, loader, hessian_regularization=0.5).float()).all()
