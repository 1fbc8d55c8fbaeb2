"""The catalogue of bad inputs tried at twicediff's public boundary, and what each gets.

tests/test_bad_inputs.py checks every case; ``python tests/bad_inputs.py --write docs/bad_inputs.md``
regenerates the table in the docs from the same cases (with the messages the library gives now).
"""
import argparse
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import twicediff
from twicediff import ops as _ops
from twicediff.errors import EngineChoiceError, ModelChangedError
from twicediff.influence import compute_influences, compute_self_influences
from twicediff.inversion import solve_hvp
from twicediff.torch import TorchTensorUtilities, TorchTwiceDifferentiable, hessian_operator
from twicediff.torch.embedding_bag import embedding_bag
from twicediff.torch.functional import get_hvp_function
from twicediff.torch.util import align_structure, reshape_vector_to_tensors
from twicediff.torch.kfac import KFACFactors


def _mlp():
    torch.manual_seed(0)
    return TorchTwiceDifferentiable(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval(),
                                    F.cross_entropy)


def _data(n=8):
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def _loader(n=8):
    return DataLoader(TensorDataset(*_data(n)), batch_size=4)


def _nan_row(n=8):
    """(x, y) with one NaN feature in point 5."""
    x, y = _data(n)
    x[5, 1] = float("nan")
    return x, y


def _b_with_nan():
    b = torch.randn(2, 26)
    b[1, 3] = float("nan")
    return b


def _frozen_after_binding():
    """A native hvp_function whose model has its first layer frozen before the call (it failed as
    "the model or loss failed on x ...: NativeEngine.apply: V must have shape [D, 26]")."""
    m = _mlp()
    product = m.hvp_function(*_data(), engine="native")
    m.model[0].requires_grad_(False)
    try:
        product(torch.randn(2, m.num_params))
    finally:
        m.model[0].requires_grad_(True)


class _ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        x.mul_(0.5)  # writes to the tensor it is given
        return self.lin(x)


def _one_shot_cg():
    """A generator of 40 batches under a 2 MB budget: the first pass cannot keep them all, so the
    second finds the generator empty (it said "training_data yielded no points")."""
    m = _mlp()
    x, y = _data(40000)
    with twicediff.memory_budget(2_000_000):
        solve_hvp("cg", m, ((x[i:i + 1000], y[i:i + 1000]) for i in range(0, 40000, 1000)), torch.randn(2, 26),
                  hessian_perturbation=1.0)


def _lissa_diverges():
    m = _mlp()
    solve_hvp("lissa", m, _loader(), torch.randn(2, m.num_params), scale=1e-4, maxiter=200)


def _lissa_stalls():
    m = _mlp()
    solve_hvp("lissa", m, _loader(), torch.randn(2, m.num_params), hessian_perturbation=0.1, maxiter=3)


def _under_inference_mode():
    m = _mlp()
    with torch.inference_mode():
        m.grad(*_data())


def _with_env(name, value, call):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return call()
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _direct_too_large():
    m = TorchTwiceDifferentiable(nn.Linear(5000, 4000).eval(), F.mse_loss)
    solve_hvp("direct", m, [(torch.randn(2, 5000), torch.randn(2, 4000))], torch.zeros(m.num_params))


def _direct_singular():
    m = _mlp()  # cross-entropy: H is singular (a constant added to every logit changes nothing)
    solve_hvp("direct", m, _loader(), torch.randn(2, m.num_params))


def _train_mode_batchnorm_float_target():
    """A model in training mode with BatchNorm (torch.func refuses it) and a float target for
    cross-entropy: every engine fails, and the error must be about the target."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    td = TorchTwiceDifferentiable(model, F.cross_entropy)
    x, y = _data(12)
    td.hvp(x, y.float(), torch.randn(2, td.num_params))


def _per_point_loss():
    """_mlp()'s model under cross-entropy without reduction: a loss of one value per point."""
    return TorchTwiceDifferentiable(_mlp().model, functools.partial(F.cross_entropy, reduction="none"))


def _native_on(model, loss):
    x = torch.randn(2, 1, 4, 4) if isinstance(model[0], nn.Conv2d) else torch.randn(2, 3)
    TorchTwiceDifferentiable(model.eval(), loss).hvp(x, torch.randint(0, 2, (2,)), torch.randn(
        sum(p.numel() for p in model.parameters())), engine="native")


def _conv():
    torch.manual_seed(0)
    return TorchTwiceDifferentiable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).eval(),
                                    F.cross_entropy)


def _wrong_features(n=8):
    """A loader of 4 features per point for _mlp(), which takes 3."""
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), batch_size=4)


def _labels_out_of_range(n=8):
    """A loader whose class indices reach 5 for _mlp()'s 2 classes."""
    return DataLoader(TensorDataset(torch.randn(n, 3), torch.full((n,), 5)), batch_size=4)


class _Pair(nn.Module):
    """A model of two inputs, called model(*x) with x = (u, w)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, u, w):
        return self.a(u) + self.b(w)


class _Tokens(nn.Module):
    """A model of token ids and a mask, called model(**x)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask[..., None].float()
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1))


def _pair():
    torch.manual_seed(0)
    return TorchTwiceDifferentiable(_Pair().eval(), F.cross_entropy)


def _tokens():
    torch.manual_seed(0)
    return TorchTwiceDifferentiable(_Tokens().eval(), F.cross_entropy)


def _token_batch(n=4, mask_rows=None):
    return ({"input_ids": torch.randint(0, 5, (n, 6)), "attention_mask": torch.ones(mask_rows or n, 6, dtype=torch.long)},
            torch.randint(0, 2, (n,)))


def _tiny_budget():
    m = _mlp()
    with twicediff.memory_budget(16):
        m.hvp(*_data(), torch.randn(4, m.num_params))


def _square_function(vmap_rule: bool):
    """x², as a custom autograd.Function with a backward only (and a generated vmap rule or none)."""
    class Square(torch.autograd.Function):
        generate_vmap_rule = vmap_rule

        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            return 2 * ctx.saved_tensors[0] * g

    return Square


def _func_on(model):
    """engine='func' on ``model`` under cross-entropy, on _data()."""
    torch.manual_seed(0)
    m = TorchTwiceDifferentiable(model, F.cross_entropy)
    m.hvp(*_data(), torch.randn(m.num_params), engine="func")


def _func_engine_through(op):
    """engine='func' on Linear → op → Linear, which torch.func cannot transform."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(op(self.a(x)))

    _func_on(Model().eval())


def _returns_tuple():
    """A model whose forward returns (logits, features), as many do."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h

    torch.manual_seed(0)
    return TorchTwiceDifferentiable(Model().eval(), F.cross_entropy)


def _embedding_hvp(**options):
    """hvp on token ids → nn.Embedding(5, 3, **options) → Flatten → Linear under cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, **options), nn.Flatten(), nn.Linear(6, 2)).eval()
    m = TorchTwiceDifferentiable(model, F.cross_entropy)
    m.hvp(torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,)), torch.randn(m.num_params))


def _functional_bag(engine):
    """hvp on a model that looks its token ids up with F.embedding_bag and a weight of its own."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.out = nn.Parameter(torch.randn(5, 3)), nn.Linear(3, 2)

        def forward(self, ids):
            return self.out(torch.tanh(F.embedding_bag(ids, self.table, mode="mean")))

    torch.manual_seed(0)
    m = TorchTwiceDifferentiable(Bag().eval(), F.cross_entropy)
    m.hvp(torch.randint(0, 5, (4, 3)), torch.randint(0, 2, (4,)), torch.randn(m.num_params), engine=engine)


def _functional_hardsigmoid(engine):
    """hvp on a model that gates with F.hardsigmoid itself (no nn.Hardsigmoid module)."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(x * F.hardsigmoid(self.inner(x)))

    torch.manual_seed(0)
    m = TorchTwiceDifferentiable(Gate().eval(), F.cross_entropy)
    m.hvp(4 * torch.randn(4, 3), torch.randint(0, 2, (4,)), torch.randn(m.num_params), engine=engine)


def _dict_taker():
    """hvp with x a dict of token ids, on a model whose forward takes one dict (batch["ids"])."""
    class DictTaker(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(5, 3), nn.Linear(3, 2)

        def forward(self, batch):
            return self.out(self.embed(batch["ids"]).mean(1))

    torch.manual_seed(0)
    m = TorchTwiceDifferentiable(DictTaker().eval(), F.cross_entropy)
    m.hvp({"ids": torch.randint(0, 5, (4, 3))}, torch.randint(0, 2, (4,)), torch.randn(m.num_params))


def _hooked(where):
    """hvp on an MLP with a gradient hook on its first weight or a backward hook on its Tanh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    if where == "parameter":
        model[0].weight.register_hook(lambda g: 0.5 * g)
    else:
        model[1].register_full_backward_hook(lambda module, grad_in, grad_out: (0.5 * grad_in[0],))
    m = TorchTwiceDifferentiable(model, F.cross_entropy)
    m.hvp(*_data(), torch.randn(m.num_params))


def _writes_its_weights():
    """hvp on a model whose forward clamps its own weight in place (a hand-made constraint)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            with torch.no_grad():
                self.a.weight.clamp_(-0.1, 0.1)
            return self.a(x)

    torch.manual_seed(0)
    m = TorchTwiceDifferentiable(Model().eval(), F.cross_entropy)
    m.hvp(*_data(), torch.randn(m.num_params))


def _grid_sample(h):
    """Volumetric sampling, which keeps torch's op (2-D sampling is routed: twicediff.torch.grid_sample)."""
    grid = torch.full((h.shape[0], 1, 1, 1, 3), 0.3, dtype=h.dtype)
    return F.grid_sample(h.reshape(-1, 1, 2, 2, 2), grid, align_corners=False).flatten(1).repeat(1, 8)


# (where, bad input, call, expected exception classes, words the message must contain)
CASES = [
    ("TorchTwiceDifferentiable", "model is not an nn.Module",
     lambda: TorchTwiceDifferentiable("net", F.mse_loss), TypeError, ["model", "nn.Module", "str"]),
    ("TorchTwiceDifferentiable", "a torch.jit.ScriptModule",
     lambda: TorchTwiceDifferentiable(torch.jit.script(nn.Linear(2, 1)), F.mse_loss), TypeError,
     ["model", "ScriptModule", "before scripting"]),
    ("TorchTwiceDifferentiable", "lazy parameters not yet initialized",
     lambda: TorchTwiceDifferentiable(nn.Sequential(nn.LazyLinear(2)), F.mse_loss), ValueError,
     ["model", "uninitialized lazy parameters", "'0.weight'", "forward pass"]),
    ("TorchTwiceDifferentiable", "no parameter requires grad",
     lambda: TorchTwiceDifferentiable(nn.Linear(2, 1).requires_grad_(False), F.mse_loss), ValueError,
     ["no parameter that requires grad"]),
    ("grad", "x and y of different lengths",
     lambda: _mlp().grad(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)), ValueError, ["x", "y", "(5, 3)", "(4,)"]),
    ("grad", "x of another dtype than the model",
     lambda: _mlp().grad(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), TypeError,
     ["x", "float64", "float32"]),
    ("grad", "a dict x whose tensors disagree on the batch size",
     lambda: _tokens().grad(*_token_batch(4, mask_rows=3)), ValueError,
     ["grad", "disagree on the batch size", "x['input_ids'] has shape (4, 6)", "x['attention_mask'] has shape (3, 6)"]),
    ("hvp", "a tuple x with a tensor of another dtype than the model",
     lambda: _pair().hvp((torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64)), torch.zeros(4, dtype=torch.long),
                         torch.randn(14)), TypeError, ["hvp", "x[1]", "float64", "float32"]),
    ("grad", "x that is neither a tensor, a tuple / list nor a dict",
     lambda: _mlp().grad("abc", torch.zeros(4, dtype=torch.long)), TypeError, ["grad", "x must be", "dict", "str"]),
    ("hvp", "engine='native' with a dict x",
     lambda: _mlp().hvp({"input": torch.randn(4, 3)}, torch.zeros(4, dtype=torch.long), torch.randn(26),
                        engine="native"), ValueError, ["engine='native'", "one tensor", "dict"]),
    ("solve_hvp (CG)", "training_data whose tuple x disagrees on the batch size",
     lambda: solve_hvp("cg", _pair(), [((torch.randn(4, 3), torch.randn(5, 2)), torch.zeros(4, dtype=torch.long))],
                       torch.randn(1, 14)), ValueError,
     ["HessianOperator", "training_data batch 0", "x[0] has shape (4, 3)", "x[1] has shape (5, 2)"]),
    ("compute_influences (perturbation)", "input_data whose x is a dict",
     lambda: compute_influences(_tokens(), [_token_batch()], influence_type="perturbation", hessian_regularization=0.1),
     TypeError, ["compute_influences_pert", "single floating-point tensor", "a dict", "influence_type='up'"]),
    ("hvp", "v of the wrong width",
     lambda: _mlp().hvp(*_data(), torch.randn(2, 5)), ValueError, ["v", "P = 26", "(2, 5)"]),
    ("hvp", "v of another dtype",
     lambda: _mlp().hvp(*_data(), torch.randn(26, dtype=torch.float64)), TypeError, ["v", "float64"]),
    ("hvp", "unknown mode",
     lambda: _mlp().hvp(*_data(), torch.randn(26), mode="newton"), ValueError, ["mode", "newton"]),
    ("hvp", "engine='native' on a conv model",
     lambda: _native_on(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 2)), F.cross_entropy),
     EngineChoiceError, ["hvp: engine='native' cannot take", "Conv2d"]),
    ("hvp", "engine='native' with a loss option it cannot take",
     lambda: _native_on(nn.Sequential(nn.Linear(3, 2)), functools.partial(F.cross_entropy, label_smoothing=0.1)),
     ValueError, ["native", "label_smoothing"]),
    ("hvp", "an embedding that scales its gradient by frequency (scale_grad_by_freq=True)",
     lambda: _embedding_hvp(scale_grad_by_freq=True),
     ValueError, ["hvp", "module '0'", "Embedding", "scale_grad_by_freq=True", "not symmetric",
                  "scale_grad_by_freq=False"]),
    ("embedding_bag", "per_sample_weights with mode='mean'",
     lambda: embedding_bag(torch.tensor([[1, 2]]), torch.randn(4, 3), per_sample_weights=torch.ones(1, 2)),
     ValueError, ["embedding_bag", "per_sample_weights", "mode='sum'", "mode='mean'"]),
    ("embedding_bag", "a 2D input with offsets",
     lambda: embedding_bag(torch.tensor([[1, 2]]), torch.randn(4, 3), torch.tensor([0])),
     ValueError, ["embedding_bag", "2D input", "offsets must be None", "(1,)"]),
    ("embedding_bag", "a padding index outside the table",
     lambda: embedding_bag(torch.tensor([[1, 2]]), torch.randn(4, 3), padding_idx=4),
     ValueError, ["embedding_bag", "padding_idx", "[-4, 4)", "got 4"]),
    ("hvp", "nn.CTCLoss with a target label equal to blank",
     lambda: TorchTwiceDifferentiable(nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (4, 2)), nn.LogSoftmax(-1)),
                                      lambda o, t: F.ctc_loss(o.transpose(0, 1), t, [4] * 3, [2] * 3)).hvp(
         torch.randn(3, 3), torch.tensor([[1, 1], [1, 0], [1, 1]]), torch.randn(2, 32)),
     RuntimeError, ["hvp", "y (3, 2) torch.int64", "ctc_loss", "target label", "other than blank = 0"]),
    ("hvp", "nn.MultiMarginLoss with a target outside the classes",
     lambda: TorchTwiceDifferentiable(_mlp().model, nn.MultiMarginLoss()).hvp(
         torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.randn(2, 26), engine="func"),
     RuntimeError, ["hvp", "y (4,) torch.int64", "multi_margin_loss", "class index in [0, 2)"]),
    ("hvp", "nn.MultiLabelMarginLoss with float targets",
     lambda: TorchTwiceDifferentiable(_mlp().model, nn.MultiLabelMarginLoss()).hvp(
         torch.randn(4, 3), torch.ones(4, 2), torch.randn(2, 26)),
     ValueError, ["hvp", "multilabel_margin_loss", "torch.long", "got torch.float32"]),
    ("hvp", "a model that calls F.embedding_bag itself (no nn.EmbeddingBag module)", lambda: _functional_bag("autograd"),
     NotImplementedError, ["hvp", "no second derivative of F.embedding_bag", "x (4, 3)",
                           "twicediff.torch.embedding_bag.embedding_bag"]),
    ("hvp", "the same, engine='func'", lambda: _functional_bag("func"),
     NotImplementedError, ["hvp", "no second derivative of F.embedding_bag", "twicediff.torch.embedding_bag"]),
    ("hvp", "a model that calls F.hardsigmoid itself (no nn.Hardsigmoid module)",
     lambda: _functional_hardsigmoid("autograd"),
     RuntimeError, ["hvp", "no second derivative of F.hardsigmoid", "x (4, 3)", "nn.Hardsigmoid",
                    "twicediff.torch.activations.hardsigmoid"]),
    ("hvp", "the same, engine='func'", lambda: _functional_hardsigmoid("func"),
     NotImplementedError, ["hvp", "no second derivative of F.hardsigmoid", "twicediff.torch.activations"]),
    ("hvp", "a dict x for a model whose forward takes the dict itself", _dict_taker,
     TypeError, ["hvp", "x {'ids': (4, 3)", "unexpected keyword argument 'ids'", "model(**x)", "(x,)"]),
    ("hvp", "a gradient hook on a parameter", lambda: _hooked("parameter"),
     ValueError, ["hvp", "parameter '0.weight'", "gradient hook", "handle.remove()"]),
    ("hvp", "a backward hook on a module", lambda: _hooked("module"),
     ValueError, ["hvp", "module '1' (Tanh)", "backward hook", "handle.remove()"]),
    ("hvp", "a forward that writes to its own weights", _writes_its_weights,
     ModelChangedError, ["hvp", "'a.weight'", "in place", "cannot undo"]),
    ("hvp", "a forward that writes to its input x in place (auto took products at x, x/2, x/4 ...)",
     lambda: TorchTwiceDifferentiable(_ScalesItsInput().eval(), F.cross_entropy).hvp(*_data(), torch.randn(8)),
     ModelChangedError, ["hvp", "writes to the batch's x in place", "several times per call", "x = x.clone()"]),
    ("hvp", "engine='func' on a model with BatchNorm in training mode",
     lambda: _func_on(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).train()),
     RuntimeError, ["hvp", "updates a buffer in place", "model.eval()", "engine='autograd'"]),
    ("hvp", "engine='func' on a model with Dropout in training mode",
     lambda: _func_on(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()),
     RuntimeError, ["hvp", "draws random numbers", "model.eval()", "engine='autograd'"]),
    ("compute_influences", "test_data of single points without a batch dimension (batch_size=None)",
     lambda: compute_influences(_mlp(), _loader(), test_data=DataLoader(TensorDataset(*_data()), batch_size=None),
                                hessian_regularization=0.1),
     ValueError, ["compute_influences", "test_data batch 0", "0-d y", "batch_size=None", "batch_size=1"]),
    ("compute_influences", "a generator as training_data and no test_data (read again, it was empty: \"holds no points\")",
     lambda: compute_influences(_mlp(), (b for b in _loader()), hessian_regularization=0.1), TypeError,
     ["compute_influences", "one-shot iterator (generator)", "test_data is None", "DataLoader or a list"]),
    ("compute_self_influences", "a generator as training_data",
     lambda: compute_self_influences(_mlp(), (b for b in _loader()), hessian_regularization=0.1), TypeError,
     ["compute_self_influences", "one-shot iterator", "DataLoader or a list"]),
    ("compute_influences", "training_data of (x, y, index) triples and no test_data",
     lambda: compute_influences(_mlp(), DataLoader(list(zip(*_data(), range(4))), batch_size=2),
                                hessian_regularization=0.1),
     TypeError, ["compute_influences", "training_data (the test points, as test_data is None)", "(x, y) pairs",
                 "length 3"]),
    ("hvp", "a loss that returns a Python float",
     lambda: TorchTwiceDifferentiable(_mlp().model, lambda out, y: float(F.cross_entropy(out, y))).hvp(
         *_data(), torch.randn(26)), TypeError, ["hvp", "the loss must return a scalar tensor", "float", ".item()"]),
    ("hvp", "a loss without a gradient (a 0-1 loss of argmax)",
     lambda: TorchTwiceDifferentiable(_mlp().model, lambda out, y: (out.argmax(-1) != y).float().mean()).hvp(
         *_data(), torch.randn(26)), ValueError, ["hvp", "the loss does not depend on the model's trainable parameters",
                                                  "argmax"]),
    ("hvp", "a model whose forward returns a tuple",
     lambda: _returns_tuple().hvp(*_data(), torch.randn(14)), TypeError,
     ["hvp", "x (8, 3)", "the model must return one tensor", "returned a tuple of 2"]),
    ("hvp", "engine='func' on a model calling an op without a forward-mode derivative (3-D grid_sample)",
     lambda: _func_engine_through(_grid_sample), NotImplementedError,
     ["hvp", "no forward-mode derivative of grid_sampler_3d", "engine='autograd'", "'auto'"]),
    ("hvp", "engine='func' on a model calling a custom autograd.Function without jvp",
     lambda: _func_engine_through(_square_function(True).apply), NotImplementedError,
     ["hvp", "custom autograd.Function has no jvp", "engine='autograd'"]),
    ("hvp", "engine='func' on a model calling a custom autograd.Function without a vmap rule",
     lambda: _func_engine_through(_square_function(False).apply), RuntimeError,
     ["hvp", "Square has no vmap rule", "engine='autograd'"]),
    ("hvp", "engine='func' on a model with activation checkpointing (saved-tensor hooks)",
     lambda: _func_engine_through(functools.partial(checkpoint, torch.tanh, use_reentrant=False)), RuntimeError,
     ["hvp", "saved-tensor hooks", "torch.utils.checkpoint", "engine='autograd'"]),
    ("hvp", "engine='func' on a model with reentrant checkpointing (an old-style autograd.Function)",
     lambda: _func_engine_through(functools.partial(checkpoint, torch.tanh, use_reentrant=True)), RuntimeError,
     ["hvp", "no setup_context", "use_reentrant=True", "engine='autograd'"]),
    ("hvp_function", "a negative expected_products",
     lambda: _mlp().hvp_function(*_data(), expected_products=-5), ValueError, ["expected_products", "-5"]),
    ("hvp", "an unknown engine in TWICEDIFF_ENGINE",
     lambda: _with_env("TWICEDIFF_ENGINE", "fastest", lambda: _mlp().hvp(*_data(), torch.randn(26))),
     ValueError, ["TWICEDIFF_ENGINE", "'fastest'", "'compiled'"]),
    ("hvp", "TWICEDIFF_CPU_BLOCK_CACHE neither 0 nor 1",
     lambda: _with_env("TWICEDIFF_CPU_BLOCK_CACHE", "yes", lambda: _mlp().hvp(*_data(), torch.randn(26), engine="func")),
     ValueError, ["TWICEDIFF_CPU_BLOCK_CACHE", "'yes'", "'0'"]),
    ("hvp", "TWICEDIFF_MATMUL_ROUTE not auto, onednn or aten",
     lambda: _with_env("TWICEDIFF_MATMUL_ROUTE", "fastest", lambda: _mlp().hvp(*_data(), torch.randn(26), engine="func")),
     ValueError, ["TWICEDIFF_MATMUL_ROUTE", "'fastest'", "onednn"]),
    ("hvp", "TWICEDIFF_CPU_GEMM neither auto nor blas",
     lambda: _with_env("TWICEDIFF_CPU_GEMM", "mkl", lambda: _mlp().hvp(*_data(), torch.randn(26))),
     ValueError, ["TWICEDIFF_CPU_GEMM", "'mkl'", "'blas'"]),
    ("hvp_function", "V of one direction as a 1-d vector",
     lambda: _mlp().hvp_function(*_data())(torch.randn(26)), ValueError, ["V", "[D, P]", "(26,)"]),
    ("hvp_function", "V of the wrong width",
     lambda: _mlp().hvp_function(*_data())(torch.randn(2, 5)), ValueError, ["V", "P = 26", "(2, 5)"]),
    ("KFACFactors.fit", "an accumulate_dtype that is not float32 or float64 (the op's check named its accumulator)",
     lambda: KFACFactors.fit(_mlp().model, F.cross_entropy, _loader(), accumulate_dtype=torch.int32), ValueError,
     ["KFACFactors.fit", "accumulate_dtype", "torch.int32"]),
    ("KFACFactors.fit", "a seed that is not an int (int()'s error)",
     lambda: KFACFactors.fit(_mlp().model, F.cross_entropy, _loader(), fisher_type="true", seed="x"), TypeError,
     ["KFACFactors.fit", "seed must be an int", "'x'"]),
    ("KFACFactors.fit", "data the model fails on (x of 4 features for a model of 3)",
     lambda: KFACFactors.fit(_mlp().model, F.cross_entropy, [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))]),
     RuntimeError, ["KFACFactors.fit: the model or loss failed on data", "x (4, 4) torch.float32"]),
    ("compute_influences (EK-FAC)", "training_data the model fails on (x of 4 features for a model of 3)",
     lambda: compute_influences(_mlp(), [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))], inversion_method="ekfac",
                                hessian_regularization=0.1),
     RuntimeError, ["compute_influences: the model or loss failed on training_data", "x (4, 4) torch.float32"]),
    ("hvp_function", "requires_grad switched after the function was made",
     _frozen_after_binding, ValueError, ["hvp_function", "trainable parameters changed", "P = 26 then, 10 now",
                                         "make a new one"]),
    ("mean_hessian", "training_data that is not iterable",
     lambda: _mlp().mean_hessian(None), TypeError, ["training_data", "iterable"]),
    ("mvp", "grad_xy without a graph",
     lambda: TorchTwiceDifferentiable.mvp(torch.randn(26), torch.randn(26), _mlp().parameters), ValueError,
     ["grad_xy", "create_graph=True"]),
    ("mvp", "backprop_on not part of the graph",
     lambda: (lambda m: m.mvp(m.grad(*_data(), create_graph=True), torch.randn(26), torch.randn(3)))(_mlp()),
     ValueError, ["backprop_on", "does not require grad"]),
    ("mvp", "backprop_on that grad_xy does not depend on",
     lambda: (lambda m: m.mvp(m.grad(*_data(), create_graph=True), torch.randn(26),
                              torch.zeros(3, requires_grad=True)))(_mlp()),
     RuntimeError, ["backprop_on[0]", "not used in grad_xy's graph"]),
    ("reshape_vector_to_tensors", "a vector of the wrong length",
     lambda: reshape_vector_to_tensors(torch.zeros(5), [(2, 2)]), ValueError, ["4 elements", "has 5"]),
    ("align_structure", "a dict with other keys",
     lambda: align_structure({"a": torch.zeros(2)}, {"b": torch.zeros(2)}), ValueError, ["keys", "'b'", "'a'"]),
    ("get_hvp_function", "an empty data_loader",
     lambda: get_hvp_function(_mlp().model, F.cross_entropy, [])(torch.zeros(26)), ValueError,
     ["data_loader", "no batch"]),
    ("hessian / hvp", "memory budget too small for one direction",
     _tiny_budget, MemoryError, ["memory budget", "set_memory_budget"]),
    ("set_memory_budget", "a negative budget",
     lambda: twicediff.set_memory_budget(-1), ValueError, ["nbytes", "> 0", "-1"]),
    ("solve_hvp", "unknown inversion method",
     lambda: solve_hvp("newton", _mlp(), _loader(), torch.randn(1, 26)), ValueError, ["newton"]),
    ("solve_hvp", "b of the wrong width",
     lambda: solve_hvp("cg", _mlp(), _loader(), torch.randn(2, 7)), ValueError, ["b", "P = 26", "(2, 7)"]),
    ("solve_hvp (CG)", "a product dtype that is not a floating dtype",
     lambda: solve_hvp("cg", _mlp(), _loader(), torch.randn(1, 26), product_dtype=torch.int32), TypeError,
     ["product_dtype", "floating", "int32"]),
    ("solve_hvp", "an empty training loader",
     lambda: solve_hvp("direct", _mlp(), [], torch.randn(1, 26)), ValueError, ["empty"]),
    ("solve_hvp", "b with a NaN (CG, Arnoldi and K-FAC returned a NaN row, Direct blamed a singular H)",
     lambda: solve_hvp("cg", _mlp(), _loader(), _b_with_nan()), ValueError, ["solve_batch_cg", "b must be finite",
                                                                             "row 1", "NaN or inf"]),
    ("compute_influences", "test_data with a NaN in x",
     lambda: compute_influences(_mlp(), _loader(), test_data=DataLoader(TensorDataset(*_nan_row()), batch_size=4),
                                hessian_regularization=0.1),
     ValueError, ["compute_influences", "point 5 of test_data", "NaN or inf", "not finite"]),
    ("compute_influences (CG)", "training_data with a NaN in x (CG iterated on NaN to maxiter)",
     lambda: compute_influences(_mlp(), DataLoader(TensorDataset(*_nan_row()), batch_size=4), test_data=_loader(),
                                inversion_method="cg", hessian_regularization=0.1),
     ValueError, ["HessianOperator", "training_data batch 1", "NaN or inf", "not finite"]),
    ("compute_influences (Direct)", "training_data with a NaN in x (it blamed a singular H + λI)",
     lambda: compute_influences(_mlp(), DataLoader(TensorDataset(*_nan_row()), batch_size=4), test_data=_loader(),
                                hessian_regularization=0.1),
     ValueError, ["solve_linear", "Hessian of training_data", "NaN or inf"]),
    ("solve_hvp (Arnoldi)", "max_iter 0 (it ran one product and returned)",
     lambda: solve_hvp("arnoldi", _mlp(), _loader(), torch.randn(1, 26), hessian_perturbation=0.1, rank_estimate=3,
                       max_iter=0), ValueError, ["max_iter", "int >= 1", "got 0"]),
    ("solve_hvp (Arnoldi)", "a tol that is not a number (torch's comparison error)",
     lambda: solve_hvp("arnoldi", _mlp(), _loader(), torch.randn(1, 26), hessian_perturbation=0.1, rank_estimate=3,
                       tol="small"), TypeError, ["tol", "must be a number", "'small'"]),
    ("solve_hvp (CG)", "a generator as training_data whose batches the budget cannot keep between passes",
     _one_shot_cg, TypeError, ["HessianOperator", "one-shot iterator (generator)", "later pass",
                               "DataLoader or a list"]),
    ("solve_hvp (LiSSA)", "iterates that become non-finite",
     _lissa_diverges, RuntimeError, ["scale", "dampen"]),
    ("solve_hvp (LiSSA)", "too few steps to converge (or a scale that diverges without overflow)",
     _lissa_stalls, RuntimeError, ["did not converge in 3 steps", "maxiter", "scale", "dampen", "on_failure"]),
    ("solve_hvp (Direct)", "a P whose [P, P] Hessian cannot fit in memory",
     _direct_too_large, MemoryError, ["P = 20,004,000", "bytes", "'cg'", "'arnoldi'", "EK-FAC"]),
    ("solve_hvp (Direct)", "a singular H + λI (λ = 0, cross-entropy)",
     _direct_singular, RuntimeError, ["singular", "hessian_perturbation", "hessian_regularization"]),
    ("compute_influences", "a negative hessian_regularization (the solvers call it hessian_perturbation)",
     lambda: compute_influences(_mlp(), _loader(), inversion_method="cg", hessian_regularization=-1.0), ValueError,
     ["compute_influences", "hessian_regularization", ">= 0", "-1.0"]),
    ("compute_influences", "a NaN hessian_regularization",
     lambda: compute_influences(_mlp(), _loader(), inversion_method="lissa", hessian_regularization=float("nan")),
     ValueError, ["compute_influences", "hessian_regularization", "nan"]),
    ("compute_influences", "hessian_regularization=None",
     lambda: compute_influences(_mlp(), _loader(), hessian_regularization=None), TypeError,
     ["compute_influences", "hessian_regularization", "a number", "None"]),
    ("compute_self_influences", "hessian_regularization given as a string",
     lambda: compute_self_influences(_mlp(), _loader(), hessian_regularization="0.1"), TypeError,
     ["compute_self_influences", "hessian_regularization", "a number", "'0.1'"]),
    ("hvp (auto)", "a float target for cross-entropy on a model torch.func refuses (BatchNorm in training mode)",
     _train_mode_batchnorm_float_target, RuntimeError, ["hvp", "y (12,) torch.float32", "target", "Long"]),
    ("hvp", "a loss that returns one value per point (reduction='none')",
     lambda: _per_point_loss().hvp(*_data(), torch.randn(2, _mlp().num_params)), ValueError,
     ["hvp", "the loss must return a scalar", "(8,)", "reduction='mean'"]),
    ("grad", "a loss that returns one value per point (reduction='none')",
     lambda: _per_point_loss().grad(*_data()), ValueError, ["grad", "the loss must return a scalar", "(8,)"]),
    ("solve_hvp", "an option the inversion method does not take",
     lambda: solve_hvp("cg", _mlp(), _loader(), torch.randn(_mlp().num_params), hessian_perturbation=0.1,
                       tolerance=1e-3), TypeError, ["solve_hvp", "['tolerance']", "'cg'", "rtol", "maxiter"]),
    ("compute_influences", "an option the inversion method does not take",
     lambda: compute_influences(_mlp(), _loader(), inversion_method="lissa", hessian_regularization=0.1, tol=1e-3),
     TypeError, ["compute_influences", "['tol']", "'lissa'", "scale"]),
    ("solve_hvp", "hessian_perturbation=True",
     lambda: solve_hvp("cg", _mlp(), _loader(), torch.randn(_mlp().num_params), hessian_perturbation=True), TypeError,
     ["hessian_perturbation", "a number", "bool"]),
    ("grad / hvp / any entry point", "called under torch.inference_mode()",
     _under_inference_mode, RuntimeError, ["grad", "inference_mode"]),
    ("hessian_operator", "unknown mode",
     lambda: hessian_operator(_mlp(), _loader(), mode="fisher"), ValueError, ["mode", "fisher"]),
    ("compute_influences", "an empty test loader",
     lambda: compute_influences(_mlp(), _loader(), test_data=[], hessian_regularization=0.1), ValueError, ["empty"]),
    ("compute_influences", "unknown influence type",
     lambda: compute_influences(_mlp(), _loader(), influence_type="sideways", hessian_regularization=0.1),
     ValueError, ["sideways"]),
    ("grad", "x of the wrong width for the model (generic engine)",
     lambda: _conv().grad(torch.randn(2, 1, 5, 5), torch.zeros(2, dtype=torch.long)), RuntimeError,
     ["grad", "x (2, 1, 5, 5)", "mat1 and mat2"]),
    ("hvp", "class indices out of range (native engine)",
     lambda: _mlp().hvp(torch.randn(4, 3), torch.full((4,), 5), torch.randn(26)), ValueError,
     ["hvp", "x (4, 3)", "class indices", "[0, 2)"]),
    ("solve_hvp (Direct)", "training_data of the wrong width",
     lambda: solve_hvp("direct", _mlp(), _wrong_features(), torch.randn(1, 26)), ValueError,
     ["mean_hessian", "training_data batch 0", "takes 3 features", "has 4"]),
    ("solve_hvp (CG)", "training_data with class indices out of range",
     lambda: solve_hvp("cg", _mlp(), _labels_out_of_range(), torch.randn(1, 26)), ValueError,
     ["HessianOperator", "training_data batch 0", "class indices", "[0, 2)"]),
    ("compute_influences", "input_data of the wrong width",
     lambda: compute_influences(_mlp(), _loader(), input_data=_wrong_features(), hessian_regularization=0.1),
     RuntimeError, ["compute_influences_up", "input_data batch 0", "x (4, 4)"]),
    ("compute_influences", "test_data with class indices out of range",
     lambda: compute_influences(_mlp(), _loader(), test_data=_labels_out_of_range(), hessian_regularization=0.1),
     IndexError, ["compute_influences", "test_data batch 0", "out of bounds"]),
    ("compute_influences (perturbation)", "input_data of the wrong width",
     lambda: compute_influences(_mlp(), _loader(), input_data=_wrong_features(), influence_type="perturbation",
                                hessian_regularization=0.1),
     RuntimeError, ["compute_influences_pert", "input_data batch 0", "x (4, 4)"]),
    ("cat_gen", "blocks that overflow the result",
     lambda: TorchTensorUtilities.cat_gen(iter([torch.zeros(3, 2)] * 2), (5, 2), _mlp()), ValueError, ["overflows"]),
    ("pack_into", "a block of another dtype",
     lambda: _ops.pack_into([torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.float64)], torch.empty(2, 5)),
     TypeError, ["blocks[1]", "Double", "Float"]),
    ("pack_into", "a block on another device",
     lambda: _ops.pack_into([torch.zeros(2, 3), torch.zeros(2, 2, device="meta")], torch.empty(2, 5)),
     ValueError, ["blocks[1]", "meta", "cpu"]),
    ("pack_into", "blocks wider than the matrix",
     lambda: _ops.pack_into([torch.zeros(2, 3), torch.zeros(2, 4)], torch.empty(2, 5)), ValueError, ["P = 5"]),
    ("pack_into", "a non-tensor",
     lambda: _ops.pack_into([torch.zeros(2, 3), [1.0, 2.0]], torch.empty(2, 5)), TypeError, ["blocks"]),
    ("blockwise_contract", "lists of different lengths",
     lambda: _ops.blockwise_contract([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2), ValueError, ["a", "b"]),
    ("cg_step", "blocks of different shapes",
     lambda: _ops.cg_step(*(torch.zeros(2, 3) for _ in range(3)), torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64)),
     ValueError, ["Ap", "shape"]),
    ("layer_norm_tangent", "no tangent at all",
     lambda: _ops.layer_norm_tangent(None, torch.zeros(3, 4), torch.ones(3)), ValueError, ["x_t", "weight_t", "None"]),
    ("layer_norm_tangent", "a tangent of another row count",
     lambda: _ops.layer_norm_tangent(torch.zeros(2, 5, 4), torch.zeros(3, 4), torch.ones(3)),
     ValueError, ["x_t", "[2, 3, 4]", "[2, 5, 4]"]),
    ("layer_norm_backward_tangent", "a tangent of another dtype",
     lambda: _ops.layer_norm_backward_tangent(torch.zeros(3, 4), torch.zeros(2, 3, 4, dtype=torch.float64), None,
                                              torch.zeros(3, 4), torch.ones(3)),
     TypeError, ["grad_out_t", "float32", "float64"]),
]


def outcome(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 — the point is to record what is raised
        return type(exc), str(exc).splitlines()[0]
    return None, ""


def table() -> str:
    lines = ["# Bad inputs and what they get", "",
             "Every case below is run by `tests/test_bad_inputs.py`; regenerate this page with",
             "`python tests/bad_inputs.py --write docs/bad_inputs.md`. Nothing crashes or hangs: each case",
             "raises a Python exception whose message names the argument, what was expected and what was given.",
             "", "| where | bad input | exception | message |", "|---|---|---|---|"]
    for where, what, call, _, _ in CASES:
        exc, msg = outcome(call)
        name = exc.__name__ if exc else "(nothing raised)"
        lines.append(f"| `{where}` | {what} | {name} | {msg.replace('|', '/')[:300]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print or write the bad-input table")
    ap.add_argument("--write", help="path of the markdown file to write")
    args = ap.parse_args()
    text = table()
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text)
