"""twicediff.torch.losses against torch's own losses: the same values and gradients on generated
inputs (every option, both reductions and none, torch's deprecated size_average / reduce, one point
as [C]), second derivatives by finite differences and forward mode equal to reverse mode, and bad
arguments named. The Hessian products of models under these losses, through every engine, are in
tests/test_differential.py (``generate_routed_loss``)."""
import functools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp

from same_as_torch import assert_same_values_and_gradients
from twicediff.torch import losses

REDUCTIONS = ("mean", "sum", "none")


def _draw(seed: int):
    """(name, twicediff's loss, torch's loss, input, target) with options drawn from the seed."""
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kind = ("multi_margin", "multilabel_margin", "huber", "soft_margin")[seed % 4]
    n, classes = r.choice([None, 1, 3, 5]), r.choice([1, 2, 4])
    shape = (classes,) if n is None else (n, classes)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    options = {"reduction": r.choice(REDUCTIONS)}
    if r.random() < 0.2 and kind != "huber":  # torch's deprecated spelling of the reduction
        options = {"size_average": r.choice([True, False]), "reduce": r.choice([True, False, None])}
    if kind == "multi_margin":
        options.update(p=r.choice([1, 2]), margin=r.choice([0.5, 1.0, 2.0]))
        if r.random() < 0.5:
            options["weight"] = torch.rand(classes, generator=gen, dtype=torch.float64)
        target = torch.randint(0, classes, shape[:-1], generator=gen)
    elif kind == "multilabel_margin":
        target = torch.randint(-1, classes, shape, generator=gen)
    elif kind == "huber":
        options["delta"] = r.choice([0.2, 1.0, 3.0])
        if r.random() < 0.4:
            options["weight"] = torch.rand(shape, generator=gen, dtype=torch.float64)
        target = torch.randn(shape if r.random() < 0.7 else shape[-1:], generator=gen, dtype=torch.float64)
    else:
        target = torch.randn(shape, generator=gen, dtype=torch.float64).sign()
    ours = functools.partial(getattr(losses, f"{kind}_loss"), **options)
    theirs = functools.partial(getattr(F, f"{kind}_loss"), **options)
    return f"seed {seed}: {kind} shape={shape} {sorted(options)}", ours, theirs, x, target


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch warns of broadcasting a target; so be it
@pytest.mark.parametrize("seed", range(80))
def test_values_and_gradients_are_torchs(seed):
    what, ours, theirs, x, target = _draw(seed)
    x = x.requires_grad_(True)
    want, got = theirs(x, target), ours(x, target)
    assert_same_values_and_gradients(got, want, (x,), what, rtol=1e-12, atol=1e-12, grad_rtol=1e-12, grad_atol=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_second_derivatives_by_finite_differences_and_in_forward_mode(seed):
    what, ours, _, x, target = _draw(seed)
    scalar = lambda x: ours(x, target).sum()  # noqa: E731
    assert torch.autograd.gradgradcheck(scalar, (x.requires_grad_(True),)), what
    v = torch.randn_like(x)
    forward = jvp(grad(scalar), (x.detach(),), (v,))[1]
    reverse = vjp(grad(scalar), x.detach())[1](v)[0]
    torch.testing.assert_close(forward, reverse, rtol=1e-12, atol=1e-12, msg=what)


def test_soft_margin_is_finite_where_torchs_overflows():
    x, y = torch.tensor([-100.0, 3.0]), torch.tensor([1.0, -1.0])
    assert torch.isinf(F.soft_margin_loss(x, y, reduction="none")[0])
    got = losses.soft_margin_loss(x, y, reduction="none")
    torch.testing.assert_close(got, torch.tensor([100.0, 3.0 + float(torch.log1p(torch.exp(torch.tensor(-3.0))))]))


def test_a_repeated_label_counts_again_and_nothing_after_the_first_minus_one():
    x = torch.randn(2, 4, dtype=torch.float64)
    for target in ([[1, 1, -1, 0], [2, -1, 3, 3]], [[1, -1, 0, 0], [2, -1, 0, 1]]):
        t = torch.tensor(target)
        torch.testing.assert_close(losses.multilabel_margin_loss(x, t), F.multilabel_margin_loss(x, t))


@pytest.mark.parametrize("call, error, words", [
    (lambda: losses.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), p=3), ValueError, "p must be 1 or 2"),
    (lambda: losses.multi_margin_loss(torch.randn(3, 4), torch.tensor([0., 1, 2])), ValueError,
     "target must hold class indices as torch.long, got torch.float32"),
    (lambda: losses.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1])), ValueError,
     r"for input of shape \(3, 4\), target must have shape \(3,\), got \(2,\)"),
    (lambda: losses.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 4, 1])), RuntimeError,
     r"every target must be a class index in \[0, 4\)"),
    (lambda: losses.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1, 1]), weight=torch.ones(3)), ValueError,
     r"weight must have one entry per class, shape \(4,\), got \(3,\)"),
    (lambda: losses.multilabel_margin_loss(torch.randn(3, 4), torch.tensor([[0, -2, 1, 1]] * 3)), RuntimeError,
     r"every target entry must be a class index in \[0, 4\) or -1"),
    (lambda: losses.multilabel_margin_loss(torch.randn(3, 4, 2), torch.zeros(3, 4, 2, dtype=torch.long)),
     ValueError, r"input must be scores \[C\] or \[N, C\]"),
    (lambda: losses.huber_loss(torch.randn(3), torch.randn(3), delta=0.0), ValueError, "delta must be positive"),
    (lambda: losses.huber_loss(torch.randn(3), torch.randn(4)), ValueError, "does not broadcast"),
    (lambda: losses.soft_margin_loss(torch.randn(3), torch.randn(3), reduction="avg"), ValueError,
     "reduction must be one of"),
])
def test_bad_arguments_are_named(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("loss, target", [(torch.nn.MultiMarginLoss(p=2), torch.tensor([0, 2, 1, 2, 0])),
                                          (torch.nn.MultiLabelMarginLoss(), torch.tensor([[1, -1, 0]] * 5))])
def test_per_sample_gradients_batch_the_target_checks(loss, target, caplog):
    """Under vmap over the points the target checks have no batching rule: they are left to the
    batch's own calls, and the gradients are batched (no fallback to one sample at a time)."""
    from twicediff import TorchTwiceDifferentiable
    from twicediff.torch.per_sample import per_sample_grads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    wrapped = TorchTwiceDifferentiable(model, loss)
    with caplog.at_level("WARNING", logger="twicediff"):
        blocks = per_sample_grads(wrapped, x, target)
    assert "one sample at a time" not in caplog.text
    got = torch.cat([b.reshape(5, -1) for b in blocks], dim=1)
    want = torch.stack([wrapped.grad(x[i:i + 1], target[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(got, want)
