"""EK-FAC influence at the scale of GPT-2 small, on the CPU: factors + scores for a ~124M-parameter
causal language model built from torch.nn (random weights, nothing downloaded).

Model: GPT-2 small's shapes (vocabulary 50,257, context 1,024 learned positions, 12 pre-norm blocks,
d = 768, 12 heads, MLP 3,072, GELU, tied input/output embedding), each block's attention as GPT-2
writes it (one Linear c_attn to q, k, v; scaled_dot_product_attention, causal; Linear c_proj), so
K-FAC tracks the four Linear layers of every block (48 layers, 85M parameters); the embeddings and
LayerNorms are left out (and logged). The output layer is the tied embedding (a matmul with
``wte.weight``, as GPT-2 and Kronfluence's GPT-2 example have it), not an nn.Linear, so no factor
of the vocabulary's width arises: a [50257, 50257] S would take 10 GB in float32 (20 GB in
float64) and its eigendecomposition hours on this CPU; the embedding is left out of the curvature
and the influence, as Kronfluence's users leave it out. Data: 128 training sequences of 32 random tokens, 8 query
sequences; loss: next-token cross-entropy summed over a sequence's tokens, averaged over sequences.

Steps timed: fit (A and S pass, float64 eigendecompositions, EK-FAC pass), query gradients of the
tracked layers ([8, 85M] as per-parameter blocks), solve, scoring of 8 queries × 128 sequences
(streamed), self-influence of the 128 sequences. The factors keep A, S and their eigenvectors in
float32 (``factor_dtype``; eigendecompositions in float64, eigenvalues and Λ̃ in float64): 2.6 GB
instead of 5.2 GB for these 48 layers. Peak memory: the process's peak resident set (VmHWM), over
the whole run and per step (reset before each step where Linux allows).

    flock /tmp/mem.lock flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/kfac_scale_gpt2.py \
        --out benchmarks/results/kfac_scale_gpt2.md
"""
import argparse
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from twicediff.torch.kfac import KFACFactors  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab=50257, context=1024, layers=12, d=768, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied output embedding


def lm_loss(logits, targets):
    """Σ over a sequence's tokens, mean over sequences (the factors' "mean" reduction)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / logits.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=128)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=12, help="transformer blocks (GPT-2 small: 12); fewer blocks of the "
                   "same width check the memory model in a fraction of the time")
    p.add_argument("--skip-self", action="store_true", help="leave out the self-influence step")
    p.add_argument("--tiny", action="store_true", help="a 2-block, d = 64, 1,000-token model: checks the script "
                   "runs (seconds), not a measurement")
    p.add_argument("--out", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    torch.manual_seed(0)
    vocab = 1000 if args.tiny else 50257
    model = (GPT(vocab=vocab, context=64, layers=2, d=64, heads=4) if args.tiny else GPT(layers=args.blocks)).eval()
    P = sum(q.numel() for q in model.parameters())
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, vocab, (args.train + args.queries, args.tokens + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    train = DataLoader(TensorDataset(x[:args.train], y[:args.train]), batch_size=args.batch)
    times = {}

    peaks = {}
    overall = [harness.peak_rss_bytes()]

    def step(name):
        if times:  # the step before: a progress line, so that a run stopped early still tells
            last = next(reversed(times))
            print(f"{last}: {times[last]:.1f} s, peak {peaks[last] / 2**30:.2f} GiB", flush=True)
        overall.append(harness.peak_rss_bytes())
        harness.reset_peak_rss()
        return name

    name = step("fit factors (A, S, eigh, EK-FAC pass)")
    start = time.perf_counter()
    factors = KFACFactors.fit(model, lm_loss, train, fisher_type="empirical", factor_dtype=torch.float32,
                              progress=True)
    times[name] = time.perf_counter() - start
    peaks[name] = harness.peak_rss_bytes()
    info = factors.info()

    name = step("query gradients (tracked layers)")
    start = time.perf_counter()
    tracked = [n for t in factors.layers for n in (t.weight_name, t.bias_name) if n]
    params = dict(model.named_parameters())
    grads = {n: torch.empty(args.queries, *params[n].shape) for n in tracked}
    for i in range(args.queries):
        j = args.train + i
        loss = lm_loss(model(x[j:j + 1]), y[j:j + 1])
        for n, gr in zip(tracked, torch.autograd.grad(loss, [params[n] for n in tracked])):
            grads[n][i] = gr
    times[name] = time.perf_counter() - start
    peaks[name] = harness.peak_rss_bytes()

    name = step(f"solve (F + lambda I)^-1, {args.queries} queries")
    start = time.perf_counter()
    pre = factors.solve(grads, damping=1e-3, method="ekfac", relative_damping=True)
    del grads
    times[name] = time.perf_counter() - start
    peaks[name] = harness.peak_rss_bytes()

    name = step(f"scores {args.queries} x {args.train}")
    start = time.perf_counter()
    scores = factors.score(model, lm_loss, pre, train)
    times[name] = time.perf_counter() - start
    peaks[name] = harness.peak_rss_bytes()
    del pre

    if not args.skip_self:
        name = step(f"self-influence of {args.train}")
        start = time.perf_counter()
        selfs = factors.self_score(model, lm_loss, train, damping=1e-3, method="ekfac", relative_damping=True)
        times[name] = time.perf_counter() - start
        peaks[name] = harness.peak_rss_bytes()
        assert selfs.shape == (args.train,) and bool((selfs > 0).all())
    peak = max(overall + list(peaks.values()))
    assert scores.shape == (args.queries, args.train) and bool(torch.isfinite(scores).all())

    lines = [harness.header("EK-FAC at GPT-2-small scale on the CPU", args.threads)
             + " (a shared 2-core machine: other jobs ran beside it, so times are inflated)", "",
             f"model: GPT-2-small-shaped causal LM from torch.nn ({len(model.h)} of its 12 blocks), random weights, "
             f"P = {P:,} "
             f"({info['tracked_params']:,} in {len(info['layers'])} tracked Linear layers; "
             f"{len(info['left_out'])} tensors left out: embeddings, LayerNorms); "
             f"{args.train} training sequences and {args.queries} queries of {args.tokens} tokens, batch "
             f"{args.batch}; empirical Fisher, relative damping 1e-3, float32 model; factors: float64 "
             "eigendecompositions, A, S, Q_A, Q_S kept in float32, eigenvalues and corrected eigenvalues float64; "
             "the tied output embedding is a matmul, not a tracked layer (no [50257, 50257] factor)", "",
             "| step | seconds | peak resident memory during the step, GiB |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {peaks[k] / 2**30:.2f} |" for k, v in times.items()]
    lines += [f"| total | {sum(times.values()):.1f} | {peak / 2**30:.2f} |", "",
              f"peak resident memory of the process: {peak / 2**30:.2f} GiB = {peak / 1e9:.2f} GB (limit asked: "
              f"< 12 GB); load average at the start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", "",
              "Command: `flock /tmp/mem.lock flock /tmp/bench.lock env PYTHONPATH=python python "
              f"benchmarks/kfac_scale_gpt2.py --threads {args.threads}"
              + (f" --blocks {args.blocks}" if args.blocks != 12 else "") + (" --skip-self" if args.skip_self else "")
              + " --out benchmarks/results/kfac_scale_gpt2.md`"]
    harness.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
