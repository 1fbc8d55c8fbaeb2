r"""The demo: finding mislabeled training images with influence functions.

On the UCI 8×8 handwritten digits shipped in ``twicediff/data`` (1,797 images, see its README):

1. split the images (seeded) into training, validation and held-out test sets and flip the labels of
   a fraction of the training points to another, random class;
2. train an MLP 64-32-10 with Tanh on the noisy training set to convergence (full-batch L-BFGS on the
   mean cross-entropy plus ``weight_decay / 2 · ‖θ‖²``);
3. score every training point z_i two ways, with the regularized Hessian H_λ = H + λI of the mean
   training loss (P = 2,410 parameters, so the Direct solver is exact and cheap):

   - harm to the validation loss: ``harm[i] = -mean_t up[t, i]``, where
     ``up[t, i] = ∇θℓ(z_t)ᵀ H_λ⁻¹ ∇θℓ(z_i)`` is :func:`twicediff.influence.compute_influences` with
     ``influence_type=Up`` over the validation points z_t (a positive ``up`` means up-weighting z_i
     lowers the loss on z_t, so a large ``harm`` means z_i raises the validation loss);
   - self-influence: ``self[i] = ∇θℓ(z_i)ᵀ H_λ⁻¹ ∇θℓ(z_i)``
     (:func:`twicediff.influence.compute_self_influences`);

4. report how well each ranking finds the flipped points: ROC AUC and precision at k, k = the number
   of flipped points.

Why λ (``regularization``) = 0.03, three times the weight decay of 0.01: the model is trained to
the minimum of mean cross-entropy + ``weight_decay / 2 · ‖θ‖²``, where the Hessian of that objective,
H + weight_decay·I, is positive semi-definite. Influence uses H, the Hessian of the loss alone, so
its smallest eigenvalues sit near -weight_decay (about 600 of the 2,410 are negative here, the lowest
at -0.00995, seed 0). H + λI is positive definite only for λ above about weight_decay; for λ well
below it, H + λI is indefinite with eigenvalues near zero, and its inverse is dominated by those
flat and negative directions, which carry noise rather than the data: with λ = 0.001 the
validation-harm AUC drops to 0.56–0.78 on seeds 0–2 (0.5 is chance). With λ between 0.01 and 0.1
it is 0.94–0.99 and the self-influence AUC about 0.99–0.998 (self-influence is less sensitive: it
still reaches 0.97–0.99 at λ = 0.001). λ = 0.03 sits in the middle of the good range;
``--regularization`` changes it.

``--method`` picks how (H + λI)⁻¹ is applied: ``direct`` (the explicit Hessian, the default),
``cg`` (conjugate gradients on Hessian-vector products), or ``ekfac`` / ``kfac``, which replace H by
the Kronecker-factored curvature F of the two Linear layers (fitted once, shared by both rankings)
and stream the scores layer by layer (:mod:`twicediff.torch.solvers.kfac`).

K-FAC and EK-FAC are damped by a rule of their own, not by λ: ``kfac_damping`` (``--kfac-damping``,
default 0.1) times each layer's mean eigenvalue (``relative_damping=True``; Kronfluence's
heuristic). An approximate curvature is best inverted with far less damping than the exact H needs:
at the exact method's λ their validation AUC falls 0.03–0.05 below Direct's on some seeds, under
this rule it stays within 0.02 of it on every seed tried, for every curvature
(``benchmarks/results/kfac_digits_accuracy.md``, damping sweep).
"""
from __future__ import annotations

import dataclasses
import gzip
import time
from importlib import resources
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..progress import progress_bar

__all__ = ["METHODS", "NUM_IMAGES", "DemoConfig", "DemoResult", "flip_labels", "format_report", "load_digits", "plot_demo",
           "precision_at_k", "roc_auc", "run_demo", "summary"]

DIGITS_FILE = "digits.csv.gz"
NUM_IMAGES = 1797
#: The inversion methods the demo offers (``--method``).
METHODS = ("direct", "cg", "ekfac", "kfac")


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 1,797 UCI 8×8 digits shipped with the package.

    Returns:
        images [1797, 64] float64 in [0, 1] (pixel counts 0..16 divided by 16), labels [1797] int64.
    """
    with resources.files("twicediff.app").joinpath("data", DIGITS_FILE).open("rb") as raw:
        with gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.float64)
    if table.shape != (NUM_IMAGES, 65):
        raise ValueError(f"load_digits: {DIGITS_FILE} must hold {NUM_IMAGES} rows of 64 pixels and a label, "
                         f"got a table of shape {table.shape}")
    return table[:, :64] / 16.0, table[:, 64].astype(np.int64)


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ranking ``positives`` above the rest by ``scores`` (both [N]):
    the probability that a random positive scores above a random negative, ties counting one half.

    Computed as the Mann-Whitney U statistic with average ranks for ties:
    ``AUC = (Σ rank(positives) - n₊(n₊+1)/2) / (n₊ n₋)``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"roc_auc: scores and positives must have the same shape, got {scores.shape} "
                         f"and {positives.shape}")
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs at least one positive and one negative, got {n_pos} positives "
                         f"and {n_neg} negatives")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # Average 1-based ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = 0.5 * (start + 1 + end)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Fraction of positives among the ``k`` highest ``scores`` ([N] each; ties broken by index)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if not 1 <= k <= scores.size:
        raise ValueError(f"precision_at_k: k must be between 1 and {scores.size} (the number of scores), got {k}")
    top = np.argsort(-scores, kind="mergesort")[:k]
    return float(positives[top].mean())


def flip_labels(labels: np.ndarray, fraction: float, rng: np.random.Generator,
                num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Replace the labels of ``round(fraction · N)`` points, chosen at random, by another class.

    Returns:
        (noisy labels [N], flipped mask [N] bool). Each flipped label is ``(label + s) mod C`` with s
        uniform in 1..C-1, so it always differs from the true one.
    """
    n = labels.shape[0]
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
    noisy = labels.copy()
    shift = rng.integers(1, num_classes, size=int(flipped.sum()))
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


@dataclasses.dataclass
class DemoConfig:
    """What the demo runs. The defaults are the documented run (under 30 s on 2 CPU cores)."""

    n_train: int = 1200
    n_val: int = 300
    flip_fraction: float = 0.1
    hidden: int = 32
    weight_decay: float = 1e-2
    regularization: float = 0.03
    kfac_damping: float = 0.1
    max_lbfgs_iterations: int = 2000
    seed: int = 0
    method: str = "direct"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    progress: bool = False

    def validate(self, n_images: int) -> None:
        for name in ("n_train", "n_val", "hidden", "max_lbfgs_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"demo: {name} must be a positive int, got {value!r}")
        if self.n_train + self.n_val > n_images:
            raise ValueError(f"demo: n_train + n_val must be at most {n_images} (the digits shipped), got "
                             f"{self.n_train} + {self.n_val}")
        if not 0 < self.flip_fraction < 1 or round(self.flip_fraction * self.n_train) < 1:
            raise ValueError(f"demo: flip_fraction must be in (0, 1) and flip at least one of the "
                             f"{self.n_train} training points, got {self.flip_fraction}")
        if not self.regularization > 0:
            raise ValueError(f"demo: regularization (λ) must be > 0, got {self.regularization}")
        if not self.kfac_damping > 0:
            raise ValueError(f"demo: kfac_damping must be > 0, got {self.kfac_damping}")
        if self.method not in METHODS:
            raise ValueError(f"demo: method must be one of {METHODS}, got {self.method!r}")
        if self.weight_decay < 0:
            raise ValueError(f"demo: weight_decay must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass
class DemoResult:
    """What the demo found. Arrays are numpy, over the training points unless said otherwise."""

    config: DemoConfig
    images: np.ndarray          # [n_train, 64] training images in [0, 1]
    given_labels: np.ndarray    # [n_train] labels the model was trained on (some flipped)
    true_labels: np.ndarray     # [n_train]
    flipped: np.ndarray         # [n_train] bool
    harm: np.ndarray            # [n_train] -mean over validation points of the Up influence
    self_influence: np.ndarray  # [n_train]
    metrics: Dict[str, Dict[str, float]]  # ranking name -> {"auc", "precision_at_k"}
    timings: Dict[str, float]   # step -> seconds
    train_accuracy: float       # on the given (noisy) labels
    test_accuracy: float        # on held-out images with true labels
    final_grad_norm: float      # ‖∇(objective)‖ at the end of training
    num_params: int
    threads: int                # torch CPU threads it ran with

    @property
    def k(self) -> int:
        return int(self.flipped.sum())


def make_model(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iterations: int,
           progress: bool) -> float:
    """Full-batch L-BFGS on mean cross-entropy + weight_decay/2 ‖θ‖², in rounds of 50 iterations,
    until the gradient's max-norm is under 1e-5, or a round no longer lowers the objective by more
    than the dtype's rounding (float32 stalls near 3e-5), or after ``max_iterations``.
    Returns the final gradient's 2-norm."""
    params = list(model.parameters())
    per_round = 50
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=per_round, history_size=20, tolerance_grad=1e-5,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    eps = torch.finfo(params[0].dtype).eps

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(model(x), y) + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        value.backward()
        return value

    previous = float("inf")
    rounds = -(-max_iterations // per_round)
    for _ in progress_bar(range(rounds), progress, desc="train (L-BFGS)", unit="round"):
        optimizer.step(objective)
        value = float(objective().detach())
        if max(float(p.grad.abs().max()) for p in params) <= 1e-5 or previous - value <= 4 * eps * abs(value):
            break
        previous = value
    objective()
    return float(torch.sqrt(sum((p.grad * p.grad).sum() for p in params)))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def split_digits(config: DemoConfig):
    """The demo's data for ``config``: (images [1797, 64], labels, (train, validation, test) index
    arrays, the training labels as given (a fraction flipped), the flipped mask), all drawn in one
    order from one generator seeded by ``config.seed``."""
    images, labels = load_digits()
    config.validate(images.shape[0])
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(images.shape[0])
    train_idx = order[:config.n_train]
    val_idx = order[config.n_train:config.n_train + config.n_val]
    test_idx = order[config.n_train + config.n_val:]
    given, flipped = flip_labels(labels[train_idx], config.flip_fraction, rng)
    return images, labels, (train_idx, val_idx, test_idx), given, flipped


def run_demo(config: Optional[DemoConfig] = None) -> DemoResult:
    """Run the demo described in this module's docstring and return what it found."""
    from ..distributed import broadcast_module_, contiguous_shard, current_group
    from ..influence import InfluenceType, compute_influences, compute_self_influences
    from ..inversion import InversionMethod
    from ..torch import TorchTwiceDifferentiable

    config = config or DemoConfig()
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    images, labels, (train_idx, val_idx, test_idx), given, flipped = split_digits(config)
    device = torch.device(config.device)

    def tensors(idx: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(images[idx], dtype=config.dtype, device=device),
                torch.as_tensor(y, dtype=torch.long, device=device))

    x_train, y_train = tensors(train_idx, given)
    x_val, y_val = tensors(val_idx, labels[val_idx])
    x_test, y_test = tensors(test_idx, labels[test_idx])
    timings["load data"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = make_model(config.hidden).to(device=device, dtype=config.dtype)
    grad_norm = train_model(model, x_train, y_train, config.weight_decay, config.max_lbfgs_iterations,
                       config.progress)
    model.eval()
    timings["train MLP (L-BFGS)"] = time.perf_counter() - start

    # Under torchrun (twicediff.distributed): every rank holds rank 0's model and a contiguous shard
    # of the training points; the influences come back for all points, in order, on every rank.
    group = current_group()
    broadcast_module_(model, group)
    first, stop = contiguous_shard(x_train.shape[0], group)
    differentiable = TorchTwiceDifferentiable(model, F.cross_entropy)
    train_loader = DataLoader(TensorDataset(x_train[first:stop], y_train[first:stop]), batch_size=256)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=256)

    method = InversionMethod(config.method)
    options: Dict[str, object] = {}
    damping = config.regularization
    if config.method in ("ekfac", "kfac"):  # fitted once, shared by both rankings
        from ..torch.kfac import KFACFactors

        damping, options["relative_damping"] = config.kfac_damping, True
        start = time.perf_counter()
        options["factors"] = KFACFactors.fit(model, lambda out, y: F.cross_entropy(out.squeeze(), y.squeeze()),
                                             train_loader, ekfac=config.method == "ekfac", progress=config.progress)
        timings[f"{config.method.upper()} factors"] = time.perf_counter() - start

    start = time.perf_counter()
    up = compute_influences(differentiable, train_loader, test_data=val_loader, input_data=train_loader,
                            inversion_method=method, influence_type=InfluenceType.Up,
                            hessian_regularization=damping, progress=config.progress, **options)
    harm = -up.mean(dim=0)
    timings["validation influence (Up)"] = time.perf_counter() - start

    start = time.perf_counter()
    self_influence = compute_self_influences(differentiable, train_loader,
                                             inversion_method=method,
                                             hessian_regularization=damping,
                                             progress=config.progress, **options)
    timings["self-influence"] = time.perf_counter() - start

    harm_np = harm.detach().cpu().double().numpy()
    self_np = self_influence.detach().cpu().double().numpy()
    k = int(flipped.sum())
    metrics = {name: {"auc": roc_auc(scores, flipped), "precision_at_k": precision_at_k(scores, flipped, k)}
               for name, scores in (("validation harm", harm_np), ("self-influence", self_np))}
    return DemoResult(
        config=config, images=images[train_idx], given_labels=given, true_labels=labels[train_idx],
        flipped=flipped, harm=harm_np, self_influence=self_np, metrics=metrics, timings=timings,
        train_accuracy=_accuracy(model, x_train, y_train), test_accuracy=_accuracy(model, x_test, y_test),
        final_grad_norm=grad_norm, num_params=differentiable.num_params, threads=torch.get_num_threads())


def summary(result: DemoResult) -> Dict[str, object]:
    """The findings as plain JSON-ready data: configuration, metrics, timings (seconds), accuracies."""
    config = {f.name: getattr(result.config, f.name) for f in dataclasses.fields(result.config)}
    config["dtype"] = str(result.config.dtype).replace("torch.", "")
    return {"config": config, "num_params": result.num_params, "num_flipped": result.k,
            "metrics": result.metrics, "timings": result.timings, "train_accuracy": result.train_accuracy,
            "test_accuracy": result.test_accuracy, "final_grad_norm": result.final_grad_norm,
            "threads": result.threads}


def _kfac_damping_lines(c: DemoConfig) -> list:
    return [f"damping: {c.kfac_damping:g} x each layer's mean eigenvalue of F (--kfac-damping; K-FAC's own rule, "
            f"not the exact method's lambda = {c.regularization:g}:",
            "  an approximate curvature needs far less damping; see `python -m twicediff demo --help`)"]


def format_report(result: DemoResult) -> str:
    """The demo's findings as a plain-text table."""
    c = result.config
    n_test = NUM_IMAGES - c.n_train - c.n_val
    lines = [
        f"twicediff demo: finding {result.k} flipped labels among {c.n_train} training digits "
        f"(UCI 8x8, seed {c.seed}, {c.device}, {str(c.dtype).replace('torch.', '')}, "
        f"{result.threads} CPU thread{'s' if result.threads > 1 else ''})",
        f"model: MLP 64-{c.hidden}-10 Tanh, P = {result.num_params:,} parameters, weight decay {c.weight_decay:g}; "
        f"trained to |grad| = {result.final_grad_norm:.1e}",
        f"accuracy: {100 * result.train_accuracy:.1f}% on the noisy training labels, "
        f"{100 * result.test_accuracy:.1f}% on {n_test} held-out test images",
        f"inversion method: {c.method}" + (" (H replaced by the Kronecker-factored curvature of the Linear layers)"
                                           if c.method in ("ekfac", "kfac") else ""),
        *(_kfac_damping_lines(c) if c.method in ("ekfac", "kfac") else [
            f"Hessian damping lambda = {c.regularization:g}: H + lambda*I is positive definite only for lambda "
            f"above about the weight decay ({c.weight_decay:g});",
            "  0.01-0.1 finds the flips; 0.001 drops the validation AUC to 0.56-0.78 (`python -m twicediff demo "
            "--help`)"]),
        "",
        f"{'ranking of training points':<44} {'ROC AUC':>8} {'precision@' + str(result.k):>14}",
        f"{'-' * 44} {'-' * 8} {'-' * 14}",
    ]
    names = {"validation harm": f"harm to validation loss (-mean Up, {c.n_val} pts)",
             "self-influence": "self-influence g_i^T (H+lambda*I)^-1 g_i"}
    for key, label in names.items():
        m = result.metrics[key]
        lines.append(f"{label:<44} {m['auc']:>8.3f} {m['precision_at_k']:>14.3f}")
    lines.append(f"{'(random ranking)':<44} {0.5:>8.3f} {c.flip_fraction:>14.3f}")
    lines += ["", f"{'step':<32} {'seconds':>8}", f"{'-' * 32} {'-' * 8}"]
    for step, seconds in result.timings.items():
        lines.append(f"{step:<32} {seconds:>8.2f}")
    lines.append(f"{'total':<32} {sum(result.timings.values()):>8.2f}")
    return "\n".join(lines)


def plot_demo(result: DemoResult, path: str, n_images: int = 16) -> None:
    """Save a PNG: the ``n_images`` most harmful training images (given and true labels; flipped
    ones framed in red) over the score distributions of flipped and clean points for both rankings."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    top = np.argsort(-result.harm, kind="mergesort")[:n_images]
    columns = 8
    rows = -(-len(top) // columns)
    fig = plt.figure(figsize=(12, 1.5 * rows + 3.6), layout="constrained")
    images_part, scores_part = fig.subfigures(2, 1, height_ratios=[1.5 * rows + 0.3, 3.3])
    n_bad = int(result.flipped[top].sum())
    images_part.suptitle(f"the {len(top)} most harmful training images by validation influence: "
                         f"{n_bad} of them have a flipped label (red)", fontsize=11)
    image_axes = images_part.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in image_axes:
        ax.set_axis_off()
    for slot, i in enumerate(top):
        ax = image_axes[slot]
        ax.set_axis_on()
        ax.imshow(result.images[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        bad = bool(result.flipped[i])
        ax.set_title(f"#{slot + 1} given {result.given_labels[i]}\ntrue {result.true_labels[i]}",
                     fontsize=8, color="red" if bad else "black")
        for spine in ax.spines.values():
            spine.set_edgecolor("red" if bad else "gray")
            spine.set_linewidth(2.5 if bad else 0.5)
    panels = (("validation harm", result.harm, "harm to validation loss (-mean Up influence)", False),
              ("self-influence", result.self_influence, "log10 self-influence", True))
    for ax, (key, scores, label, log) in zip(scores_part.subplots(1, 2), panels):
        values = np.log10(np.maximum(scores, np.finfo(np.float64).tiny)) if log else scores
        bins = np.histogram_bin_edges(values, bins=40)
        # Densities, so that the 10% flipped points are as visible as the clean ones.
        ax.hist(values[~result.flipped], bins=bins, density=True, alpha=0.6, color="tab:blue",
                label=f"clean ({int((~result.flipped).sum())})")
        ax.hist(values[result.flipped], bins=bins, density=True, alpha=0.6, color="tab:red",
                label=f"flipped ({result.k})")
        threshold = np.sort(values)[-result.k]
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"top {result.k} to the right")
        m = result.metrics[key]
        ax.set_title(f"{key}: AUC {m['auc']:.3f}, precision@{result.k} {m['precision_at_k']:.2f}", fontsize=10)
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("density of training points", fontsize=9)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
