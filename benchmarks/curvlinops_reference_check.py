"""Which side of the curvlinops gap on d_transformer is right: twicediff's and curvlinops 3.0.1's
Hessian products in float64 against an independent torch.func reference (jvp of grad through
functional_call, one direction at a time), on bench's d_transformer preset (or another: d_encoder,
torch's own TransformerEncoderLayer, shows the same gap).

    benchmarks/.venv-curvlinops/bin/python benchmarks/curvlinops_reference_check.py [--preset d_transformer]

Prints each side's largest difference from the reference, relative to the reference's largest entry,
then the cause on a minimal function (:func:`layer_norm_check`): curvlinops' product is
``jvp(jacrev(loss))``, and in torch 2.14.1 forward mode over ``jacrev`` is wrong through an affine
LayerNorm whose input depends on the parameters, where forward over ``grad`` (twicediff's func and
compiled engines) agrees with finite differences.
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from twicediff import TorchTwiceDifferentiable  # noqa: E402
from twicediff.app import bench  # noqa: E402
from twicediff.torch.guard import attention_for_derivatives  # noqa: E402


def reference_products(model, loss, x, y, V):
    """[P, D] Hessian products of the mean loss, one jvp-of-grad per column."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def mean_loss(*p):
        return loss(functional_call(model, dict(zip(names, p)), (x,)), y)

    def product(v):
        parts, off = [], 0
        for p in params:
            parts.append(v[off:off + p.numel()].view_as(p))
            off += p.numel()
        _, tangent = jvp(lambda *p: grad(mean_loss, argnums=tuple(range(len(p))))(*p), params, tuple(parts))
        return torch.cat([t.reshape(-1) for t in tangent])

    return torch.stack([product(V[:, j]) for j in range(V.shape[1])], 1)


def layer_norm_check() -> None:
    """H t for L(W, w, b) = sum(sin(layer_norm(x W, w, b))), float64, three ways: jvp over grad,
    jvp over jacrev, and central differences of grad (step 1e-6); with the LayerNorm's input
    independent of W or without its affine weight the three agree."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, dtype=torch.float64)

    def loss(p, affine=True, depends=True):
        h = x @ p["W"] if depends else x
        out = torch.nn.functional.layer_norm(h, (6,), p["w"] if affine else None, p["b"] if affine else None)
        return out.sin().sum()

    p = {"W": torch.randn(6, 6, dtype=torch.float64), "w": torch.randn(6, dtype=torch.float64),
         "b": torch.randn(6, dtype=torch.float64)}
    t = {k: torch.randn_like(v) for k, v in p.items()}
    for affine, depends in [(True, True), (True, False), (False, True)]:
        f = lambda q: loss(q, affine, depends)  # noqa: E731
        by_grad, by_jacrev = jvp(grad(f), (p,), (t,))[1], jvp(jacrev(f), (p,), (t,))[1]
        step = 1e-6
        plus = grad(f)({k: p[k] + step * t[k] for k in p})
        minus = grad(f)({k: p[k] - step * t[k] for k in p})
        fd = {k: (plus[k] - minus[k]) / (2 * step) for k in p}
        gap = lambda a: max(float((a[k] - fd[k]).abs().max()) for k in p)  # noqa: E731
        print(f"layer_norm(affine={affine}, input depends on W={depends}): |jvp(grad) - fd| = {gap(by_grad):.1e}, "
              f"|jvp(jacrev) - fd| = {gap(by_jacrev):.1e}")


def main():
    from curvlinops import HessianLinearOperator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="d_transformer", choices=sorted(bench.PRESETS))
    ap.add_argument("--directions", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, loss, x, y = bench.PRESETS[args.preset][1](torch.device("cpu"))
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    td = TorchTwiceDifferentiable(model, loss)
    V = torch.randn(td.num_params, args.directions, dtype=torch.float64)
    ours = td.hvp(x, y, V.T.contiguous(), engine="autograd").T
    loss_module = {"cross_entropy": nn.CrossEntropyLoss, "mse_loss": nn.MSELoss}[loss.__name__]()
    with attention_for_derivatives():  # what plain torch needs on torch's attention layers (d_encoder)
        ref = reference_products(model, loss, x, y, V)
        theirs = HessianLinearOperator(model, loss_module, [p for p in model.parameters() if p.requires_grad],
                                       [(x, y)], check_deterministic=False) @ V
    scale = float(ref.abs().max())
    print(f"{args.preset}, float64, {args.directions} directions, P = {td.num_params}")
    print(f"twicediff  vs reference: {float((ours - ref).abs().max()) / scale:.1e}")
    print(f"curvlinops vs reference: {float((theirs - ref).abs().max()) / scale:.1e}")
    layer_norm_check()


if __name__ == "__main__":
    main()
