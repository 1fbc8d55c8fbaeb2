"""Would convolutions written as GEMMs make the compiled d_cnn product faster? Copies of bench's d_cnn
preset whose convolutions are rewritten (same parameters, same products), each run through the
compiled engine, timed interleaved with the original and the per-direction loop:

- ``unfold_all``: every convolution as ``weight @ unfold(x)`` per sample (a batched matmul);
- ``patches_first``: the first convolution only, its input unfolded once into a [C·k·k, N·L] patch
  matrix, so that each product is one GEMM, the output permuted back to [N, C_out, H, W].

    flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/conv_unfold_check.py [--repeats 7]

Prints ms per HVP (D = 64) and each rewrite's largest difference from the original's products.
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import harness
from twicediff import TorchTwiceDifferentiable
from twicediff.app import bench


class _UnfoldConv2d(nn.Conv2d):
    """A Conv2d (groups 1) computed as unfold and matmul; ``patches``: as one GEMM over a [C·k·k, N·L]
    patch matrix instead of a matmul per sample."""

    patches = False

    def forward(self, x):
        N, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        bias = self.bias[:, None] if self.bias is not None else 0
        if not self.patches:
            return (self.weight.flatten(1) @ cols + bias).view(N, -1, Ho, Wo)
        K, L = cols.shape[1], cols.shape[2]
        out = self.weight.flatten(1) @ cols.permute(1, 0, 2).reshape(K, N * L) + bias
        return out.view(-1, N, Ho, Wo).permute(1, 0, 2, 3)


def _rewritten(model: nn.Sequential, which, patches: bool) -> nn.Sequential:
    out = copy.deepcopy(model)
    convs = [i for i, m in enumerate(out) if isinstance(m, nn.Conv2d)]
    for i in (convs if which == "all" else convs[:1]):
        m = out[i]
        u = _UnfoldConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                          bias=m.bias is not None)
        u.patches = patches
        u.load_state_dict(m.state_dict())
        out[i] = u
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, loss, x, y = bench.PRESETS["d_cnn"][1](torch.device("cpu"))
    D = 64
    tds = {"conv": TorchTwiceDifferentiable(model, loss),
           "unfold_all": TorchTwiceDifferentiable(_rewritten(model, "all", False), loss),
           "patches_first": TorchTwiceDifferentiable(_rewritten(model, "first", True), loss)}
    V = torch.randn(D, tds["conv"].num_params)
    want = tds["conv"].hvp(x, y, V, engine="compiled")
    for name, td in tds.items():
        gap = float((td.hvp(x, y, V, engine="compiled") - want).abs().max())
        print(f"{name}: max |Δ| against conv {gap:.1e}")
    fns = {name: (lambda td=td: td.hvp(x, y, V, engine="compiled")) for name, td in tds.items()}
    fns["loop"] = lambda: tds["conv"].hvp(x, y, V[:16], engine="loop")
    med = bench.interleaved_medians(fns, args.repeats)
    print(f"{harness.run_facts()}; load average {harness.load_average()}")
    print("ms per HVP:", {k: round(v * 1e3 / (16 if k == "loop" else D), 3) for k, v in med.items()})


if __name__ == "__main__":
    main()
