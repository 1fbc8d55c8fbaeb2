"""The check the tests of twicediff's equivalents of torch ops share (tests/torch/test_losses.py,
test_ctc.py, test_cdist.py, test_grid_sample.py): the same values as torch's op, and the same
gradients of a random weighting of them in every input."""
import torch


def assert_same_values_and_gradients(got: torch.Tensor, want: torch.Tensor, inputs, what: str, *, rtol: float,
                                     atol: float, grad_rtol: float, grad_atol: float) -> None:
    """``got`` (ours) and ``want`` (torch's), both computed from ``inputs`` (tensors that require
    grad): equal shapes and values, and equal gradients of ``⟨w, ·⟩`` for one random w in each input
    (an input one side does not use counts as zeros). Gradients are compared only where torch's
    values are all finite."""
    assert got.shape == want.shape, what
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=what)
    if not torch.isfinite(want).all():
        return
    weights = torch.randn_like(want)
    theirs = torch.autograd.grad(want, inputs, weights, allow_unused=True, materialize_grads=True)
    ours = torch.autograd.grad(got, inputs, weights, allow_unused=True, materialize_grads=True)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol, msg=f"{what}: gradient of input {k}")
