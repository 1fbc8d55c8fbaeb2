"""The two problems of kfac_peers_cpu.py, in plain torch so that every side (twicediff in the
project's venv, Kronfluence and pyDVL 0.10 in their own venvs) builds the same network from the
same state_dict, and helpers the runners share (timing, peak memory, the JSON line they print).

- "mlp": the demo's digits MLP 64-32-10 Tanh (P = 2,410), float32.
- "transformer": a 2-block pre-norm transformer classifier over token ids (vocabulary 512,
  64 tokens, d = 128, 4 heads, MLP 512, GELU; learned positions; mean-pooled, Linear head to 10
  classes): P = 471,818, of which 396,810 in the 9 Linear layers that K-FAC tracks (qkv, proj, fc,
  out of each block, and the head); the embeddings and LayerNorms are left out by every side.

The per-sample loss ℓ_n is the cross-entropy of sample n (one label per sequence for the
transformer), the same on every side.
"""
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS, D, HEADS, BLOCKS, CLASSES = 512, 64, 128, 4, 2, 10


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class Block(nn.Module):
    def __init__(self, d: int = D, heads: int = HEADS):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TransformerClassifier(nn.Module):
    """Token ids [B, T] -> logits [B, CLASSES]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.zeros(TOKENS, D))
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))


def build(problem: str) -> nn.Module:
    return {"mlp": build_mlp, "transformer": TransformerClassifier}[problem]()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set so far: VmHWM, which starts afresh at exec (ru_maxrss would
    carry the parent's peak over into a runner started by the benchmark process)."""
    return _status_bytes("VmHWM")


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS")


class Clock:
    """Wall-clock seconds of named steps."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, name: str):
        clock = self

        class _Step:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Step()


def report(clock: Clock, rss_before: int, **extra) -> None:
    """The one JSON line a runner prints last: times, peak and baseline resident memory."""
    print(json.dumps(dict(seconds=clock.seconds, peak_rss=peak_rss_bytes(), rss_before=rss_before,
                          torch=torch.__version__, threads=torch.get_num_threads(), **extra)), flush=True)
