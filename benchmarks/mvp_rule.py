"""The measurement behind ``twicediff.torch.mvp.use_batched_backward`` (the mvp rule): for D
directions, one backward pass per direction (the loop, pyDVL 0.7's mvp) against one vmapped backward
pass (``is_grads_batched``), with torch.func forward-over-reverse and one plain gradient for scale.
Medians of interleaved repeats in one process; writes benchmarks/results/mvp_rule.md.

    PYTHONPATH=python python benchmarks/mvp_rule.py [--threads 2] [--repeats 5] [--out PATH]
"""
import argparse
import os

import torch

from harness import git_commit, interleaved_medians, machine
from twicediff.app.presets import make_mlp
from twicediff.torch.batch import squeezed_loss
from twicediff.torch.engines.func import func_hvp
from twicediff.torch.mvp import mvp_batched, mvp_loop

MODELS = {  # name: (layer widths, N)
    "small 16-32-10": ([16, 32, 10], 128),
    "(a) 64-128-128-10": ([64, 128, 128, 10], 512),
    "large 256-512-512-10": ([256, 512, 512, 10], 512),
}
DIRECTIONS = (1, 2, 4, 16, 64)


def summary(ratios) -> str:
    """The rule's justification from {D: [batched / loop per model]}."""
    text = "batched / loop over the models: " + "; ".join(
        f"D = {D}: {min(r):.2f} to {max(r):.2f}" for D, r in sorted(ratios.items())) + ". "
    many = [r for D, rs in ratios.items() if D >= 2 for r in rs]
    one = ratios.get(1, [])
    text += (f"Rule (`use_batched_backward`): a chunk of one direction takes a plain backward pass "
             f"(the vmapped one costs up to {max(one, default=float('nan')):.2f}× as much there), chunks of "
             f"two or more take one vmapped pass (never slower than the loop here: at most "
             f"{max(many, default=float('nan')):.2f}×). On CUDA the loop launches every kernel D times at "
             "sizes that leave the GPU idle, so the same rule holds there by a wider margin.")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mvp_rule.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# The mvp rule: per-direction loop vs one vmapped backward pass", "",
             f"Machine: {machine()} (shared), "
             f"torch {torch.__version__}, {args.threads} threads, commit {git_commit()}, float32, "
             f"Tanh MLPs under cross-entropy; medians of {args.repeats} interleaved repeats.", "",
             "Command: `PYTHONPATH=python python benchmarks/mvp_rule.py "
             f"--threads {args.threads} --repeats {args.repeats}`", "",
             "| model | P | D | loop ms | batched ms | batched / loop | func fwd-over-rev ms | plain grad ms |",
             "|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    ratios = {}
    for name, (widths, N) in MODELS.items():
        model, loss, x, y = make_mlp(widths, torch.nn.Tanh, N, "ce")
        params = [p for p in model.parameters()]
        P = sum(p.numel() for p in params)
        value = squeezed_loss(loss, model(x), y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, params, create_graph=True)])

        def plain_grad():
            torch.autograd.grad(squeezed_loss(loss, model(x), y), params)

        for D in DIRECTIONS:
            v = torch.randn(D, P)
            out = torch.empty(D, P)
            med = interleaved_medians({
                "loop": lambda: mvp_loop(g, v, params, out),
                "batched": lambda: mvp_batched(g, v, params, out),
                "func": lambda: func_hvp(model, loss, x, y, v),
                "grad": plain_grad,
            }, args.repeats)
            ratios.setdefault(D, []).append(med["batched"] / med["loop"])
            lines.append(f"| {name} | {P} | {D} | {med['loop'] * 1e3:.2f} | {med['batched'] * 1e3:.2f} | "
                         f"{med['batched'] / med['loop']:.2f} | {med['func'] * 1e3:.2f} | {med['grad'] * 1e3:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", summary(ratios)]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
