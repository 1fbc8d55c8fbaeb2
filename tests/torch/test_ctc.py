"""twicediff.torch.ctc against torch's ``F.ctc_loss``: the same values on generated inputs (padded
and concatenated targets, one sequence as [T, C], any blank, empty targets, empty inputs, targets
no alignment reaches, every reduction, ``zero_infinity``) and the same gradients of the logits
through ``log_softmax``; its own derivatives by finite differences (torch's gradient with respect to
``log_probs`` is not one: below); a model trained with ``nn.CTCLoss`` through every engine and the
Hessian against finite differences of torch's own gradient; bad arguments named."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from same_as_torch import assert_same_values_and_gradients
from twicediff import TorchTwiceDifferentiable
from twicediff.torch.ctc import ctc_loss


def _draw(seed: int):
    """(description, logits [T, N, C] or [T, C], targets, input_lengths, target_lengths, options)."""
    r = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    T, N, C, S = r.randint(1, 9), r.randint(1, 4), r.randint(2, 6), r.randint(0, 5)
    blank = r.randrange(C)
    labels = [c for c in range(C) if c != blank]
    target_lengths = [r.randint(0, S) for _ in range(N)]
    input_lengths = [r.randint(0 if r.random() < 0.1 else 1, T) for _ in range(N)]
    # a label repeated next to itself half the time: its alignments need a blank between
    rows = [[r.choice(labels[:1] if r.random() < 0.3 else labels) for _ in range(S)] for _ in range(N)]
    targets = torch.tensor(rows, dtype=torch.long).reshape(N, S)
    form = r.choice(["padded", "concatenated", "one sequence" if N == 1 else "padded"])
    if form == "concatenated":
        targets = torch.cat([targets[n, :target_lengths[n]] for n in range(N)])
    logits = torch.randn(T, N, C, generator=gen, dtype=torch.float64)
    if form == "one sequence":
        logits, targets = logits[:, 0], targets[0, :target_lengths[0]]
        input_lengths, target_lengths = torch.tensor(input_lengths[0]), torch.tensor(target_lengths[0])
    else:
        input_lengths, target_lengths = torch.tensor(input_lengths), torch.tensor(target_lengths)
    options = {"blank": blank, "reduction": r.choice(["mean", "sum", "none"]), "zero_infinity": r.random() < 0.5}
    what = f"seed {seed}: T={T} N={N} C={C} S={S} {form} lengths {input_lengths} / {target_lengths} {options}"
    return what, logits, targets, input_lengths, target_lengths, options


@pytest.mark.parametrize("seed", range(120))
def test_values_and_gradients_of_the_logits_are_torchs(seed):
    what, logits, targets, input_lengths, target_lengths, options = _draw(seed)
    logits = logits.requires_grad_(True)
    want = F.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, **options)
    got = ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, **options)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), what  # targets no alignment reaches
    assert_same_values_and_gradients(got, want, (logits,), what, rtol=1e-12, atol=1e-12, grad_rtol=1e-11,
                                     grad_atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_first_and_second_derivatives_by_finite_differences(seed):
    """gradcheck and gradgradcheck with respect to the log-probabilities themselves, which need not
    be normalised. torch's own backward returns another tensor there: one that only through
    ``log_softmax`` gives the logits' gradient (checked below), so it is no reference for them."""
    _, logits, targets, input_lengths, target_lengths, options = _draw(seed)
    options["zero_infinity"] = True  # an unreachable target's inf has no derivative to check
    log_probs = logits.log_softmax(-1).detach().requires_grad_(True)

    def loss(lp):
        return ctc_loss(lp, targets, input_lengths, target_lengths, **options)

    assert torch.autograd.gradcheck(loss, (log_probs,))
    assert torch.autograd.gradgradcheck(loss, (log_probs,))


def test_torchs_gradient_of_log_probs_is_not_their_derivative():
    """Why the first test goes through log_softmax: if this starts failing, torch's backward became
    the derivative, and the tests can compare gradients of ``log_probs`` directly."""
    torch.manual_seed(0)
    log_probs = torch.randn(5, 2, 4, dtype=torch.float64).log_softmax(-1).requires_grad_(True)
    args = (torch.tensor([[1, 2], [3, 3]]), torch.tensor([5, 4]), torch.tensor([2, 2]))
    theirs, = torch.autograd.grad(F.ctc_loss(log_probs, *args), log_probs)
    ours, = torch.autograd.grad(ctc_loss(log_probs, *args), log_probs)
    assert float((theirs - ours).abs().max()) > 0.1


class _Recognizer(nn.Module):
    """Frames [N, T, F] → a GRU → per-frame class scores [N, T, C]."""

    def __init__(self, features=3, hidden=4, classes=4):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.rnn(x)[0]))


def _ctc(input_lengths, target_lengths):
    criterion = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss(scores, targets):
        return criterion(scores.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths)
    return loss


def test_every_engine_and_the_hessian_of_a_ctc_model_against_finite_differences():
    """The Hessian products of a model under nn.CTCLoss (every engine: torch has no second
    derivative of its CTC kernel and every one failed) against central differences of torch's own
    gradient through its own kernel, which is right through log_softmax."""
    torch.manual_seed(0)
    model = _Recognizer().double().eval()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 2], [3, 1, 0], [2, 0, 0]])
    input_lengths, target_lengths = torch.tensor([6, 5, 4]), torch.tensor([3, 2, 1])
    loss = _ctc(input_lengths, target_lengths)
    td = TorchTwiceDifferentiable(model, loss)
    params = list(model.parameters())

    def torch_grad(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)
        g = torch.autograd.grad(loss(model(x), targets), params)
        return torch.cat([t.reshape(-1) for t in g])

    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    V = torch.randn(2, td.num_params, dtype=torch.float64)
    eps = 1e-6
    want = torch.stack([(torch_grad(theta + eps * v) - torch_grad(theta - eps * v)) / (2 * eps) for v in V])
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)
    torch.testing.assert_close(td.grad(x, targets), torch_grad(theta), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)
    for engine in ("auto", "func", "autograd", "loop"):
        torch.testing.assert_close(td.hvp(x, targets, V, engine=engine), want, rtol=1e-6, atol=1e-7, msg=engine)
    torch.testing.assert_close(V @ td.hessian(x, targets), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("call, words", [
    (lambda lp: ctc_loss(lp, torch.tensor([[1, 0]]), [3], [2]), ["target label", "other than blank = 0"]),
    (lambda lp: ctc_loss(lp, torch.tensor([[1, 2]]), [4], [2]), ["input length", "[0, 3]"]),
    (lambda lp: ctc_loss(lp, torch.tensor([[1, 2]]), [3], [2], reduction="avg"), ["reduction", "'avg'"]),
    (lambda lp: ctc_loss(lp, torch.tensor([1, 2, 1]), [3], [2]), ["sum(target_lengths) = 2", "got 3"]),
    (lambda lp: ctc_loss(lp, torch.tensor([[1.0, 2.0]]), [3], [2]), ["targets", "integer", "float32"]),
    (lambda lp: ctc_loss(lp, torch.tensor([[1, 2]]), [3, 3], [2]), ["input_lengths", "1 integer"]),
    (lambda lp: ctc_loss(lp, torch.tensor([[1, 2]]), [3], [2], blank=7), ["blank", "[0, 4)", "7"]),
    (lambda lp: ctc_loss(lp[:0], torch.tensor([[1, 2]]), [0], [2]), ["T > 0", "(0, 1, 4)"]),  # torch refuses it too
])
def test_bad_arguments_are_named(call, words):
    log_probs = torch.randn(3, 1, 4).log_softmax(-1)
    with pytest.raises((ValueError, RuntimeError)) as info:
        call(log_probs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
