"""Every inverse-HVP solver on batches whose x is a tuple (``model(*x)``) or a dict (``model(**x)``):
Direct, CG (block and per-row), LiSSA and Arnoldi against the dense float64 solve of the
torch.func Hessian; K-FAC and EK-FAC against the same model spelled with one tensor x."""
import pytest
import torch
import torch.nn.functional as F

from twicediff.inversion import solve_hvp
from twicediff.torch import TorchTwiceDifferentiable

from structured_models import DT, PROBLEMS, batches, reference, stacked_x

SPELLINGS = {"tuple": lambda x: torch.cat(x, 1), "dict": stacked_x}


def damping(H: torch.Tensor, smallest: float = 0.5) -> float:
    """λ that makes H + λI positive definite with its smallest eigenvalue ``smallest`` (the Hessians
    here are indefinite), so that every solver converges."""
    return smallest - min(0.0, float(torch.linalg.eigvalsh(H)[0]))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method, options, one_batch", [
    ("direct", {}, False),
    ("cg", dict(rtol=1e-10, atol=0.0), False),  # block CG
    ("cg", dict(rtol=1e-10, atol=0.0, block_krylov=False), False),
    ("cg", dict(rtol=1e-10, atol=0.0, product_dtype=None), False),
    # one batch: LiSSA's steps are then deterministic and converge to the exact solution
    ("lissa", dict(maxiter=2000, rtol=1e-11), True),
    ("arnoldi", dict(), False),
])
def test_solvers_match_the_dense_float64_solve(name, method, options, one_batch):
    model, _, x, y = PROBLEMS[name]()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    _, H = reference(name)
    lam = damping(H, 1.5 if method == "lissa" else 0.5)  # LiSSA: fewer steps to converge
    P = td.num_params
    b = torch.randn(3, P, dtype=DT, generator=torch.Generator().manual_seed(1))
    want = torch.linalg.solve(H + lam * torch.eye(P, dtype=DT), b.T).T
    if method == "lissa":
        # contracting: scale above the largest eigenvalue of H + λI
        options = dict(options, scale=float(torch.linalg.eigvalsh(H)[-1]) + lam + 0.5)
    if method == "arnoldi":
        if name == "dict":
            # rank r: the r eigenpairs of H + λI largest in |θ|, against the same truncation of the dense matrix
            r = 12
            vals, vecs = torch.linalg.eigh(H + lam * torch.eye(P, dtype=DT))
            top = vals.abs().argsort(descending=True)[:r]
            want = (b @ vecs[:, top]) / vals[top] @ vecs[:, top].T
            options = dict(rank_estimate=r, tol=1e-12)
        else:
            options = dict(rank_estimate=P)  # full rank: the exact inverse
    data = [(x, y)] if one_batch else batches(x, y, 4)
    got = solve_hvp(method, td, data, b, hessian_perturbation=lam, **options)
    assert got.x.shape == (3, P) and got.x.dtype == DT
    assert rel(got.x, want) < 1e-7, rel(got.x, want)


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_the_tensor_x_spelling(name, method):
    model, spelled, x, y = PROBLEMS[name]()
    td, ts = TorchTwiceDifferentiable(model, F.cross_entropy), TorchTwiceDifferentiable(spelled, F.cross_entropy)
    b = torch.randn(2, td.num_params, dtype=DT, generator=torch.Generator().manual_seed(2))
    got = solve_hvp(method, td, batches(x, y, 4), b, hessian_perturbation=0.1)
    want = solve_hvp(method, ts, batches(SPELLINGS[name](x), y, 4), b, hessian_perturbation=0.1)
    torch.testing.assert_close(got.x, want.x, rtol=1e-12, atol=1e-12)
    assert float(got.x.abs().max()) > 0
    if name == "dict":  # the embedding and position parameters are outside the tracked Linear layers
        assert got.info["left_out"] == ["position", "embed.weight", "norm.weight", "norm.bias"]
        assert float(got.x[:, :48].abs().max()) == 0.0
    again = solve_hvp(method, td, batches(x, y, 4), b, hessian_perturbation=0.1, factors=got.info["factors"])
    torch.testing.assert_close(again.x, got.x)


def test_solvers_name_the_batch_whose_inputs_disagree():
    model, _, x, y = PROBLEMS["dict"]()
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    bad = [(x, y), ({**x, "input_ids": x["input_ids"][:6]}, y)]
    b = torch.ones(1, td.num_params, dtype=DT)  # b = 0 would be solved without a pass over the data
    for method, words in [("direct", "mean_hessian: the inputs disagree"),
                          ("cg", "HessianOperator: the model or loss failed on training_data batch 1"),
                          ("lissa", "solve_lissa: the model or loss failed on a batch of training_data"),
                          ("arnoldi", "HessianOperator: the model or loss failed on training_data batch 1"),
                          ("ekfac", "KFACFactors.fit: the inputs disagree")]:
        with pytest.raises(ValueError) as info:
            solve_hvp(method, td, bad, b, hessian_perturbation=1.0)
        message = str(info.value)
        assert words in message and "disagree on the batch size" in message, message
        assert "x['input_ids'] has shape (6, 5)" in message and "x['attention_mask'] has shape (10, 5)" in message
