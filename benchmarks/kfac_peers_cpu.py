"""twicediff's EK-FAC influence against Kronfluence 1.0.1 and pyDVL 0.10.0's EkfacInfluence on the
CPU: same model, data, damping and Fisher type, in one run, interleaved.

Problems (kfac_peer_models.py): (a) the demo's digits MLP (1,200 training digits with 10% flipped
labels, trained by the demo's L-BFGS, seed 0; queries: the first 64 validation digits), and (b) a
2-block transformer classifier (d = 128, 64 tokens, P = 471,818) trained for two Adam epochs on
a synthetic task (1,024 training sequences of 64 token ids, label c: half of the tokens drawn
from the ids ≡ c mod 10, the rest uniform; 64 query sequences).

Each side runs in its own process (its own venv for the peers) and reports factor-fitting time
(covariances, eigendecompositions, the EK-FAC eigenvalue correction), scoring time (gradients of
the 64 queries, preconditioning, contraction with every training sample's gradient: the
[64, N_train] matrix) and its peak resident memory (VmHWM, and what it held before the work).
Every side first does the same work on a small slice (warm-up: lazy imports and one-time setup
do not count). Rounds are interleaved (twicediff, Kronfluence, pyDVL, then again; pyDVL, by far
the slowest, only in the first --pydvl-rounds rounds).

Matched settings: EK-FAC on every nn.Linear (embeddings and LayerNorms left out everywhere),
empirical Fisher (true labels; Kronfluence use_empirical_fisher=True), per-sample loss = the
sample's cross-entropy (twicediff: mean over a batch with reduction "mean", Kronfluence: summed;
both give the per-sample gradients ∇ℓ_n), eigenvalue correction Λ̃ = mean_n (Q_Sᵀ G_n Q_A)² with
G_n the per-sample gradient summed over tokens, absolute damping λ added to Λ̃, float32 model,
float64 eigendecompositions. pyDVL fixes its own Fisher (the pseudo-loss Σ_c √p_c log p_c) and,
for sequences, corrects the eigenvalues per token (Σ_t of squares, not the square of Σ_t); the
table also compares it with twicediff fitted on pyDVL's pseudo-loss.

    flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/kfac_peers_cpu.py \
        --out benchmarks/results/kfac_peers_cpu.md

The peer venvs: ``bash benchmarks/setup_kfac_peer_venvs.sh``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kfac_peer_models as models  # noqa: E402

N_QUERIES = 64
PEER_TIMEOUT_S = 900  # one side's run; pyDVL's per-sample gradients of a transformer take longest
PEERS = {"kronfluence": (".venv-kronfluence", "kronfluence_runner.py"),
         "pydvl": (".venv-pydvl010", "pydvl010_ekfac_runner.py")}


def pseudo_loss(output, target):
    """pyDVL 0.10's EK-FAC curvature loss Σ_n Σ_c √p_nc log p_nc (the targets are not used)."""
    p = torch.softmax(output, -1)
    logp = torch.log_softmax(output, -1)
    return (logp * p.detach().sqrt()).sum()


# ---- the problems ------------------------------------------------------------------------------
def digits_problem(threads: int) -> dict:
    from kfac_digits_accuracy import setup
    from twicediff.app import demo

    config = demo.DemoConfig()
    model, (xt, yt), (xv, yv), _ = setup(0, config)
    return dict(problem="mlp", state_dict=model.state_dict(), train_x=xt, train_y=yt, query_x=xv[:N_QUERIES],
                query_y=yv[:N_QUERIES], damping=config.regularization, batch_size=256, threads=threads,
                fisher="empirical", description=f"digits MLP 64-32-10 Tanh, P = 2,410, {xt.shape[0]} training "
                f"digits, lambda = {config.regularization} (the demo's)")


def transformer_problem(threads: int, n_train: int = 1024, epochs: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    n = n_train + N_QUERIES
    # Sequence of class c: half of its tokens drawn from the ids ≡ c (mod 10), the rest uniform.
    y = torch.randint(0, models.CLASSES, (n,), generator=g)
    x = torch.randint(0, models.VOCAB, (n, models.TOKENS), generator=g)
    own = torch.randint(0, models.VOCAB // models.CLASSES, (n, models.TOKENS), generator=g) * models.CLASSES + y[:, None]
    x = torch.where(torch.rand(n, models.TOKENS, generator=g) < 0.5, own, x)
    torch.manual_seed(0)
    model = models.TransformerClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=g)
        for k in range(0, n_train, 64):
            idx = order[k:k + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[n_train:]).argmax(1) == y[n_train:]).float().mean())
    # λ: one tenth of the mean corrected eigenvalue over all tracked entries (Kronfluence's
    # heuristic scale, as one absolute number so that every side, pyDVL included, takes it).
    from twicediff.torch.kfac import KFACFactors

    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=128)
    factors = KFACFactors.fit(model, F.cross_entropy, train, fisher_type="empirical")
    total = sum(float(v.sum()) for v in factors.corrected.values())
    count = sum(v.numel() for v in factors.corrected.values())
    damping = float(f"{0.1 * total / count:.3g}")
    return dict(problem="transformer", state_dict=model.state_dict(), train_x=x[:n_train], train_y=y[:n_train],
                query_x=x[n_train:], query_y=y[n_train:], damping=damping, batch_size=128, threads=threads,
                fisher="empirical", description=f"transformer classifier (2 blocks, d = 128, 64 tokens, P = 471,818; "
                f"396,810 in 9 tracked Linear layers), {n_train} training sequences, query accuracy {acc:.2f}, "
                f"lambda = {damping:g} (0.1 x the mean corrected eigenvalue)")


# ---- twicediff's side, in a child process ------------------------------------------------------
def twicediff_child(inputs_path: str, out_path: str, fisher: str) -> None:
    from twicediff.influence import compute_influences
    from twicediff.torch import TorchTwiceDifferentiable
    from twicediff.torch.kfac import KFACFactors

    inputs = torch.load(inputs_path)
    torch.set_num_threads(inputs["threads"])
    model = models.build(inputs["problem"])
    model.load_state_dict(inputs["state_dict"])
    model.eval()
    wrapped = TorchTwiceDifferentiable(model, F.cross_entropy)
    bs = inputs["batch_size"]
    fit_loss, reduction = (pseudo_loss, "sum") if fisher == "pydvl" else (F.cross_entropy, "mean")

    def run(n_train, n_queries, clock):
        train = DataLoader(TensorDataset(inputs["train_x"][:n_train], inputs["train_y"][:n_train]), batch_size=bs)
        queries = DataLoader(TensorDataset(inputs["query_x"][:n_queries], inputs["query_y"][:n_queries]),
                             batch_size=N_QUERIES)
        with clock("fit"):
            factors = KFACFactors.fit(model, fit_loss, train, fisher_type="empirical", reduction=reduction)
        with clock("score"):
            return compute_influences(wrapped, train, test_data=queries, inversion_method="ekfac",
                                      hessian_regularization=inputs["damping"], factors=factors)

    run(2 * bs, 2, models.Clock())
    rss_before = models.current_rss_bytes()
    clock = models.Clock()
    values = run(None, None, clock)
    torch.save(values.detach().float(), out_path)
    import twicediff

    models.report(clock, rss_before, version=f"twicediff {getattr(twicediff, '__version__', '')}".strip())


# ---- the orchestration -------------------------------------------------------------------------
BASELINE = {"pythonpath": None}  # --baseline: another twicediff tree, run as the side "baseline"


def run_side(side: str, inputs_path: str, out: str, workdir: str, fisher: str = "empirical") -> dict:
    env = None
    if side in ("twicediff", "baseline"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", inputs_path, out, fisher]
        if side == "baseline":
            env = dict(os.environ, PYTHONPATH=BASELINE["pythonpath"])
    else:
        venv, script = PEERS[side]
        cmd = [os.path.join(HERE, venv, "bin", "python"), os.path.join(HERE, script), inputs_path, out]
        if side == "kronfluence":
            cmd.append(workdir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {PEER_TIMEOUT_S} s (warm-up included); stopped"}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
        return {"error": (errors or lines or [f"exit status {proc.returncode}"])[-1]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["values"] = torch.load(out)
    return info


def correlations(a: torch.Tensor, b: torch.Tensor) -> tuple:
    a, b = a.double().numpy().ravel(), b.double().numpy().ravel()
    return float(stats.spearmanr(a, b)[0]), float(stats.pearsonr(a, b)[0])


def compare(problem: dict, rounds: int, pydvl_rounds: int, tmp: str, with_pydvl: bool = True) -> dict:
    path = os.path.join(tmp, f"{problem['problem']}.pt")
    torch.save({k: v for k, v in problem.items() if k != "description"}, path)
    sides = (["twicediff"] + (["baseline"] if BASELINE["pythonpath"] else []) + ["kronfluence"]
             + (["pydvl"] if with_pydvl and pydvl_rounds > 0 else []))
    runs = {s: [] for s in sides}
    for r in range(rounds):
        for side in sides:
            if side == "pydvl" and r >= pydvl_rounds:
                continue
            info = run_side(side, path, os.path.join(tmp, f"{side}.pt"), os.path.join(tmp, f"kf{r}"))
            runs[side].append(info)
            print(problem["problem"], side, {k: v for k, v in info.items() if k != "values"}, flush=True)
    matched = (run_side("twicediff", path, os.path.join(tmp, "twicediff_pydvl_fisher.pt"), tmp, fisher="pydvl")
               if "pydvl" in sides else {"error": "pyDVL not run"})
    ours = runs["twicediff"][-1]["values"]
    rows = {}
    for side in sides:
        ok = [i for i in runs[side] if "error" not in i]
        if not ok:
            rows[side] = {"error": runs[side][-1]["error"]}
            continue
        fit = statistics.median(i["seconds"]["fit"] for i in ok)
        score = statistics.median(i["seconds"]["score"] for i in ok)
        total = statistics.median(i["seconds"]["fit"] + i["seconds"]["score"] for i in ok)
        row = dict(fit=fit, score=score, total=total, peak=max(i["peak_rss"] for i in ok),
                   before=statistics.median(i["rss_before"] for i in ok), version=ok[-1]["version"],
                   torch=ok[-1]["torch"], threads=ok[-1]["threads"], rounds=len(ok))
        if side != "twicediff":
            row["spearman"], row["pearson"] = correlations(ours, ok[-1]["values"])
            if side == "pydvl" and "error" not in matched:
                row["spearman_matched"], row["pearson_matched"] = correlations(matched["values"], ok[-1]["values"])
        rows[side] = row
    if "pydvl" not in sides:
        rows["pydvl"] = {"skipped": "not run (--pydvl-problems leaves this problem out)"}
    return rows


def table(problem: dict, rows: dict) -> list:
    base = rows["twicediff"]
    lines = [f"### {problem['description']}", "",
             f"64 queries x {problem['train_x'].shape[0]} training points, batch {problem['batch_size']}, "
             f"empirical Fisher, absolute damping {problem['damping']:g}; medians of {base.get('rounds', 0)} "
             f"interleaved rounds (pyDVL: {rows.get('pydvl', {}).get('rounds', 0)}, the first of each).", "",
             "| side | fit, s | score, s | end to end, s | Kronfluence / side | peak RSS, MiB (before the work) "
             "| Spearman with twicediff | Pearson with twicediff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    kf = rows.get("kronfluence", {})
    for side in ("twicediff", "baseline", "kronfluence", "pydvl"):
        if side not in rows:
            continue
        r = rows[side]
        if "skipped" in r:
            lines.append(f"| {side} | {r['skipped']} | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:160]} | | | | | | |")
            continue
        ratio = f"{kf['total'] / r['total']:.2f}x" if "total" in kf else "-"
        corr = ("1 (itself)", "1 (itself)") if side == "twicediff" else (f"{r['spearman']:.4f}", f"{r['pearson']:.4f}")
        name = f"{r['version']} (baseline: {BASELINE['label']})" if side == "baseline" else r["version"]
        lines.append(f"| {name} | {r['fit']:.2f} | {r['score']:.2f} | {r['total']:.2f} | {ratio} | "
                     f"{r['peak'] / 2**20:.0f} ({r['before'] / 2**20:.0f}) | {corr[0]} | {corr[1]} |")
    if "spearman_matched" in rows.get("pydvl", {}):
        p = rows["pydvl"]
        lines += ["", f"pyDVL against twicediff fitted on pyDVL's own curvature loss (Σ_c √p_c log p_c, "
                  f"reduction sum): Spearman {p['spearman_matched']:.4f}, Pearson {p['pearson_matched']:.4f}."]
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=3, metavar=("INPUTS", "OUT", "FISHER"), help=argparse.SUPPRESS)
    p.add_argument("--problems", nargs="+", default=["mlp", "transformer"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pydvl-rounds", type=int, default=1, help="rounds that include pyDVL (the slowest side)")
    p.add_argument("--pydvl-problems", nargs="*", default=None,
                   help="problems pyDVL runs on (default: all of --problems); its per-sample gradients of the "
                   "transformer did not finish within the 900 s timeout, so leaving it out saves that wait")
    p.add_argument("--baseline", nargs=2, metavar=("PYTHONPATH", "LABEL"), default=None,
                   help="also run the twicediff of another tree (its python/ folder), interleaved, as a before/after")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.child:
        twicediff_child(*args.child)
        return
    import harness

    if args.baseline:
        BASELINE["pythonpath"], BASELINE["label"] = os.path.abspath(args.baseline[0]), args.baseline[1]

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines = [harness.header("EK-FAC influence: twicediff against Kronfluence and pyDVL 0.10 on the CPU", args.threads),
             "", f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (a shared 2-core machine: "
             "other jobs ran beside it; the ratios come from interleaved rounds of one run). Each side runs in its "
             "own process and venv with the same torch; times are wall-clock seconds.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems:
            problem = digits_problem(args.threads) if name == "mlp" else transformer_problem(args.threads)
            with_pydvl = args.pydvl_problems is None or name in args.pydvl_problems
            rows = compare(problem, args.rounds, args.pydvl_rounds, tmp, with_pydvl)
            lines += table(problem, rows)
            print("\n".join(table(problem, rows)), flush=True)
    lines.append(f"Command: `flock /tmp/bench.lock env PYTHONPATH=python python benchmarks/kfac_peers_cpu.py "
                 f"--threads {args.threads} --rounds {args.rounds} --pydvl-rounds {args.pydvl_rounds} "
                 + (f"--pydvl-problems {' '.join(args.pydvl_problems)} " if args.pydvl_problems is not None else "")
                 + (f"--baseline {args.baseline[0]} {args.baseline[1]} " if args.baseline else "")
                 + "--out benchmarks/results/kfac_peers_cpu.md`")
    harness.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
