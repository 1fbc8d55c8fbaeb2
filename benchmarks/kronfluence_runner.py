"""Kronfluence 1.0.1's side of kfac_peers_cpu.py, run in benchmarks/.venv-kronfluence (made by
setup_kfac_peer_venvs.sh), which has no twicediff.

    python kronfluence_runner.py INPUTS.pt OUT.pt WORKDIR

INPUTS.pt (written by kfac_peers_cpu.py): problem, state_dict, train_x/train_y, query_x/query_y,
damping (a number: absolute; None: Kronfluence's heuristic 0.1 × the mean of each module's
corrected eigenvalues), fisher ("empirical" or "true"), batch sizes, threads. Fits EK-FAC factors
(fit_all_factors) and the pairwise scores [queries, train] (compute_pairwise_scores) on the CPU,
after the same work on a small slice (warm-up);
WORKDIR takes Kronfluence's output files (it writes factors and scores to disk, which is part of
its time). Saves the scores to OUT.pt and prints one JSON line (kfac_peer_models.report).

The task: per-sample loss ℓ_n = cross-entropy of sample n, summed over the batch (Kronfluence's
convention); the measurement of a query is its loss, so a score is g_qᵀ (F + λI)⁻¹ g_n as
twicediff's up-weighting value. Every nn.Linear is tracked (get_influence_tracked_modules None).
"""
import logging
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kfac_peer_models as models  # noqa: E402


def main(inputs_path: str, out_path: str, workdir: str) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    inputs = torch.load(inputs_path)
    torch.set_num_threads(inputs["threads"])
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = models.build(inputs["problem"])
    model.load_state_dict(inputs["state_dict"])
    task = Classification()
    model = prepare_model(model, task)
    analyzer = Analyzer("kfac_peers", model, task, cpu=True, disable_tqdm=True, output_dir=workdir)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    bs = inputs["batch_size"]

    def run(n_train, n_queries, name, clock):
        train = TensorDataset(inputs["train_x"][:n_train], inputs["train_y"][:n_train])
        queries = TensorDataset(inputs["query_x"][:n_queries], inputs["query_y"][:n_queries])
        with clock("fit"):
            factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=inputs["fisher"] == "empirical")
            analyzer.fit_all_factors(name, dataset=train, per_device_batch_size=bs, factor_args=factor_args,
                                     overwrite_output_dir=True)
        with clock("score"):
            analyzer.compute_pairwise_scores(f"{name}_scores", name, query_dataset=queries, train_dataset=train,
                                             per_device_query_batch_size=len(queries), per_device_train_batch_size=bs,
                                             score_args=ScoreArguments(damping_factor=inputs["damping"]),
                                             overwrite_output_dir=True)
            return analyzer.load_pairwise_scores(f"{name}_scores")  # it writes them to disk and returns None

    run(2 * bs, 2, "warmup", models.Clock())
    rss_before = models.current_rss_bytes()
    clock = models.Clock()
    scores = run(None, None, "ekfac", clock)
    torch.save(scores["all_modules"].detach().float(), out_path)
    import kronfluence
    models.report(clock, rss_before, version=f"kronfluence {kronfluence.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
