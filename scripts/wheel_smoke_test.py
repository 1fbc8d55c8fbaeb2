"""Smoke test of an installed twicediff (run by scripts/ci_wheel_smoke.sh from outside the source
tree, in a venv holding only torch, numpy, tqdm and the wheel): build record, pack/unpack, grad and
mvp on CPU, each against a float64 reference computed here with plain torch.

    python wheel_smoke_test.py [--expect-cuda-kernels 0|1] [--expect-version 0.1.0+pt2141cu130]
"""
import argparse
import importlib.metadata
import os
import sys

import torch
from torch import nn
from torch.func import functional_call, hessian


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(f"wheel smoke test failed: {name} {detail}")


def rel_err(out, ref):
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-cuda-kernels", type=int, choices=(0, 1))
    parser.add_argument("--expect-version")
    args = parser.parse_args()

    import twicediff
    from twicediff import ops as _ops
    from twicediff.torch import TorchTwiceDifferentiable

    where = os.path.dirname(twicediff.__file__)
    check("imported from the installed package", "site-packages" in where, where)
    info = twicediff.build_info()
    print("build_info:", info)
    check("built for the running torch series",
          info["torch"].split(".")[:2] == torch.__version__.split(".")[:2],
          f"{info['torch']} vs {torch.__version__}")
    if args.expect_cuda_kernels is not None:
        check("cuda_kernels as built", info["cuda_kernels"] == bool(args.expect_cuda_kernels),
              f"{info['cuda_kernels']}")
    if args.expect_version:
        version = importlib.metadata.version("twicediff")
        check("installed version carries the tag", version == args.expect_version, version)

    gen = torch.Generator().manual_seed(0)
    # pack: K blocks [B, *shape_k] into rows [r0, r0 + B) of a poisoned [N, P] matrix, and back.
    shapes = [(3, 4), (5,), (), (2, 0, 3), (1, 1, 7)]
    B, r0 = 6, 2
    blocks = [torch.randn(B, *s, dtype=torch.float64, generator=gen) for s in shapes]
    P = sum(b[0].numel() for b in blocks)
    out = torch.full((B + 3, P), float("nan"), dtype=torch.float64)
    _ops.pack_into(blocks, out, r0)
    ref = torch.cat([b.reshape(B, -1) for b in blocks], dim=1)
    check("pack_into", torch.equal(out[r0:r0 + B], ref) and out[:r0].isnan().all()
          and out[r0 + B:].isnan().all())
    back = [torch.full_like(b, float("nan")) for b in blocks]
    _ops.unpack_into(out[r0:r0 + B], back)
    check("unpack_into", all(torch.equal(a, b) for a, b in zip(back, blocks)))

    # grad and mvp of a small float64 MLP under cross-entropy, against torch.func.hessian.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(16, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    loss = nn.functional.cross_entropy
    td = TorchTwiceDifferentiable(model, loss)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params = {n: t.reshape(p.shape) for n, t, p in
                  zip(names, torch.split(flat, sizes), model.parameters())}
        return loss(functional_call(model, params, (x,)).squeeze(), y.squeeze())

    g_ref = torch.func.grad(loss_of)(theta)
    H_ref = hessian(loss_of)(theta)
    g = td.grad(x, y)
    check("grad [P]", g.shape == (td.num_params,) and rel_err(g, g_ref) <= 1e-10,
          f"rel. error {rel_err(g, g_ref):.1e}")
    v = torch.randn(7, td.num_params, dtype=torch.float64, generator=gen)
    hv = TorchTwiceDifferentiable.mvp(td.grad(x, y, create_graph=True), v, td.parameters)
    check("mvp [D, P]", hv.shape == v.shape and rel_err(hv, v @ H_ref) <= 1e-10,
          f"rel. error {rel_err(hv, v @ H_ref):.1e}")
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
