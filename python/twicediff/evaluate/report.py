"""An evaluation as a text table, and as a PNG of LDS against time."""
from __future__ import annotations

from typing import Dict

from .core import Evaluation

__all__ = ["format_table", "plot_lds_time"]

LABELS: Dict[str, str] = {
    "identity": "identity (gradient dot products)",
    "direct": "Direct (exact inverse)",
    "cg": "CG",
    "lissa": "LiSSA",
    "arnoldi-10": "Arnoldi, rank 10",
    "arnoldi-100": "Arnoldi, rank 100",
    "kfac": "K-FAC",
    "ekfac": "EK-FAC",
    "kfac-ggn": "K-FAC, GGN",
    "ekfac-ggn": "EK-FAC, GGN",
    "kfac-rel": "K-FAC, 0.1 x mean eigenvalue",
    "ekfac-rel": "EK-FAC, 0.1 x mean eigenvalue",
    "kfac-ggn-rel": "K-FAC, GGN, 0.1 x mean eigenvalue",
    "ekfac-ggn-rel": "EK-FAC, GGN, 0.1 x mean eigenvalue",
}


def _label(name: str) -> str:
    return LABELS.get(name, name)


def format_table(ev: Evaluation) -> str:
    """The evaluation's findings as a plain-text (and markdown) table."""
    c, r = ev.config, ev.retrain
    lines = [
        f"LDS over {c['num_subsets']} subsets of {c['subset_size']} of the {c['n_train']} training points "
        f"(fraction {c['fraction']:g}), {c['num_seeds']} seed(s) each ({r['trained']} trained now, "
        f"{r['reused']} reused from the cache), measurement: {c['measurement']} at {c['n_test']} test points; "
        f"95% bootstrap interval over test points; lambda = {c['hessian_regularization']:g}; P = {c['num_params']:,}",
    ]
    if r.get("split_half") is not None:
        lines.append(f"retraining noise: split-half Spearman between the seed halves' means = {r['split_half']:.3f}")
    detection = c.get("num_flipped") is not None
    header = f"| {'method':<34} | {'LDS':>6} | {'95% CI':>15} | {'time, s':>8} |"
    rule = f"|{'-' * 36}|{'-' * 7}:|{'-' * 16}:|{'-' * 9}:|"
    if detection:
        header += " self AUC | self P@k | val AUC | val P@k |"
        rule += "---------:|---------:|--------:|--------:|"
    lines += ["", header, rule]
    for name, m in ev.methods.items():
        low, high = m["lds_ci"]
        row = f"| {_label(name):<34} | {m['lds']:>6.3f} | {f'[{low:.3f}, {high:.3f}]':>15} | {m['seconds']['total']:>8.2f} |"
        if detection:
            cells = []
            for key in ("self_influence", "validation_harm"):
                d = m.get(key)
                cells += [f"{d['auc']:.3f}", f"{d['precision_at_k']:.3f}"] if d else ["-", "-"]
            row += f" {cells[0]:>8} | {cells[1]:>8} | {cells[2]:>7} | {cells[3]:>7} |"
        lines.append(row)
    lines.append("")
    self_points = c.get("self_influence_points") or c["n_train"]
    sampled = detection and self_points < c["n_train"]
    lines.append(f"time, s: one solve of (H + lambda*I) x = b for all {c['n_test']} test"
                 + (f", {c['n_val']} validation" if c.get("n_val") else "")
                 + (f" and {self_points} training (self-influence)" if detection else "")
                 + " right-hand sides, and the dot products that turn the factors into scores")
    if detection:
        lines.append(f"self/val: ranking the training points by self-influence / by harm to the validation loss; "
                     f"k = {c['num_flipped']} flipped labels"
                     + (f" (self: k = {c['self_influence_flipped']} flipped among {self_points} training points "
                        f"drawn at random)" if sampled else ""))
    options = c.get("method_options") or {}
    tuned = [f"{_label(name)}: {text}" for name, text in options.items() if "(" in text and not text.endswith("()")]
    if tuned:
        lines.append("options: " + "; ".join(tuned))
    return "\n".join(lines)


def plot_lds_time(ev: Evaluation, path: str) -> None:
    """Save a PNG: each method's LDS (with its interval) against the seconds its test influences took."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    placed: list = []
    for name, m in ev.methods.items():
        t = max(m["seconds"]["total"], 1e-4)
        low, high = m["lds_ci"]
        # Past ten methods the colours repeat: a method with its own damping ("-rel") gets squares.
        ax.errorbar([t], [m["lds"]], yerr=[[m["lds"] - low], [high - m["lds"]]],
                    fmt="s" if name.endswith("-rel") else "o", capsize=4, label=_label(name))
        # Labels of points close together (the K-FAC family) are stacked instead of overprinted.
        near = sum(1 for (u, v) in placed if abs(v - m["lds"]) < 0.02 and 0.5 < u / t < 2)
        placed.append((t, m["lds"]))
        ax.annotate(_label(name), (t, m["lds"]), textcoords="offset points", xytext=(6, 4 - 9 * near), fontsize=7)
    if ev.retrain.get("split_half") is not None:
        ax.axhline(ev.retrain["split_half"], color="gray", linestyle="--", linewidth=1,
                   label="retraining noise (split-half)")
    ax.set_xscale("log")
    ax.set_xlabel("seconds for all influences of the method (log scale)")
    ax.set_ylabel("linear datamodeling score (Spearman)")
    c = ev.config
    ax.set_title(f"LDS against time: {c['num_subsets']} subsets x {c['num_seeds']} seeds, "
                 f"{c['n_test']} test points ({c['measurement']})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)
