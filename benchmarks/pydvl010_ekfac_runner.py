"""pyDVL 0.10.0's EkfacInfluence, the other side of kfac_peers_cpu.py, run in
benchmarks/.venv-pydvl010 (made by setup_kfac_peer_venvs.sh), which has no twicediff.

    python pydvl010_ekfac_runner.py INPUTS.pt OUT.pt

INPUTS.pt as for kronfluence_runner.py; the damping must be absolute (pyDVL has no relative
one). ``EkfacInfluence(model, update_diagonal=True, hessian_regularization=λ).fit(train loader)``
then ``influences(query_x, query_y, train_x, train_y, mode=Up)`` [queries, train] (after the same
work on a small slice: warm-up), which pyDVL
defines as ⟨H⁻¹∇ℓ_query, ∇ℓ_n⟩ (twicediff's sign). What pyDVL fixes and the other sides do not:
its curvature comes from the pseudo-loss Σ_c √p_c log p_c of the model's outputs (neither the
empirical nor a sampled Fisher), and every leaf module with trainable parameters must be an
nn.Linear: the runner freezes the other parameters (embeddings, LayerNorms, positions), which the
other sides leave out of the curvature and the influence too. Saves the values to OUT.pt and
prints one JSON line (kfac_peer_models.report).
"""
import logging
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kfac_peer_models as models  # noqa: E402


def main(inputs_path: str, out_path: str) -> None:
    import pydvl
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import EkfacInfluence

    inputs = torch.load(inputs_path)
    torch.set_num_threads(inputs["threads"])
    logging.disable(logging.WARNING)
    if inputs["damping"] is None:
        raise ValueError("pyDVL's EkfacInfluence takes an absolute hessian_regularization only")
    model = models.build(inputs["problem"])
    model.load_state_dict(inputs["state_dict"])
    model.eval()
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in linear)
    bs = inputs["batch_size"]

    def run(n_train, n_queries, clock):
        x, y = inputs["train_x"][:n_train], inputs["train_y"][:n_train]
        with clock("fit"):
            influence = EkfacInfluence(model, update_diagonal=True, hessian_regularization=inputs["damping"])
            influence.fit(DataLoader(TensorDataset(x, y), batch_size=bs))
        with clock("score"):
            return influence.influences(inputs["query_x"][:n_queries], inputs["query_y"][:n_queries], x, y,
                                        mode=InfluenceMode.Up)

    run(2 * bs, 2, models.Clock())
    rss_before = models.current_rss_bytes()
    clock = models.Clock()
    values = run(None, None, clock)
    torch.save(values.detach().float(), out_path)
    models.report(clock, rss_before, version=f"pydvl {pydvl.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
