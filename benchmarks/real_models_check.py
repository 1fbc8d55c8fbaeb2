"""Architectures twicediff's tests did not write: timm's CNNs, vision transformer and MLP-mixer and
transformers' text and speech models, built with random weights (no download), through every
engine, per-sample gradients, the mixed products of perturbation influences and the model guard, in
float64 against references of plain torch.

    bash benchmarks/setup_model_zoo.sh        # timm and transformers, beside the project's venv
    .venv/bin/python benchmarks/real_models_check.py [--only resnet bert ...] [--out FILE]

The reference of the Hessian products is torch's reverse-over-reverse product of the same batch
loss (``loss(squeeze(model(x)), squeeze(y))``), one direction at a time, under the math backend of
scaled_dot_product_attention (torch's fused CPU kernels have no second derivative). Where torch
cannot differentiate the model twice (MobileNetV3's Hardsigmoid) or does it wrongly (the weight
normalisation of Wav2Vec2's positional convolution), it is central differences of torch's own
gradient, step 1e-5: right to about 1e-9 of the products' size, so that column's threshold is 1e-6.
The per-sample reference is torch's gradient of each point's loss as a batch of one; the mixed
products' (``∇x_i (v · ∇θ ℓ_i)``, perturbation influences) is torch's reverse-over-reverse product or,
for the two models above, differences of torch's input gradient along v. Every weight
is moved by noise of size 1e-2 first: timm zero-initialises some (the last BatchNorm of a block),
which puts ReLU inputs exactly on their kink, where a difference quotient has no limit.

Each cell is the largest difference from the reference relative to the reference's largest entry.
Llama's RMSNorm computes in float32 inside a float64 model (transformers casts), so every engine
differs from the reference by about 1e-7 there; that row's threshold is 1e-6.
The compiled engine runs under ``TWICEDIFF_COMPILE_BACKEND`` (this script sets ``aot_eager``
unless told otherwise: dynamo and AOT autograd trace what inductor would receive, without
generating C++, which would take minutes per model on two cores).
"""
import argparse
import copy
import logging
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, ".venv-models"))
os.environ.setdefault("TWICEDIFF_COMPILE_BACKEND", "aot_eager")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import harness  # noqa: E402
from twicediff import TorchTwiceDifferentiable  # noqa: E402
from twicediff.torch.per_sample import per_sample_grads, per_sample_mixed_products  # noqa: E402
from twicediff.torch.weight_norm import uses_weight_norm  # noqa: E402

ENGINES = ("auto", "func", "autograd", "loop", "compiled")
N = 4


class Logits(nn.Module):
    """A transformers model called with keyword inputs, returning its logits (the tensor the loss takes)."""

    def __init__(self, model: nn.Module, key: str = "input_ids"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x, attention_mask=None):
        kwargs = {self.key: x} if attention_mask is None else {self.key: x, "attention_mask": attention_mask}
        return self.model(**kwargs).logits


def _timm(name: str, **options):
    import timm
    return lambda: timm.create_model(name, pretrained=False, num_classes=3, **options)


def _text(kind: str):
    def make():
        import transformers as T
        small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50,
                     max_position_embeddings=32)
        models = {
            "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**small, num_labels=3)),
            "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**small, num_labels=3, pad_token_id=1)),
            "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
                vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=3)),
            "gpt2": lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
                n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, num_labels=3, pad_token_id=0)),
            "llama": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
                **small, num_key_value_heads=1, num_labels=3, pad_token_id=0)),
            "gpt2_lm": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50,
                                                              n_positions=32)),
        }
        return Logits(models[kind]())
    return make


def _wav2vec2():
    import transformers as T
    config = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                              vocab_size=6, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                              num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                              do_stable_layer_norm=True, mask_time_prob=0.0)
    return Logits(T.Wav2Vec2ForCTC(config), key="input_values")


def _next_token_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _ctc_loss(logits, labels):
    frames = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    return F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), labels, frames,
                      torch.full((logits.shape[0],), labels.shape[1], dtype=torch.long))


def cases():
    """{name: (make the model, x, loss, y, threshold)}: x a tensor or (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 32, 32, generator=g, dtype=torch.float64)
    classes = torch.randint(0, 3, (N,), generator=g)
    ids = torch.randint(2, 50, (N, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])
    audio = torch.randn(N, 400, generator=g, dtype=torch.float64)
    labels = torch.randint(1, 6, (N, 3), generator=g)
    image = (images, F.cross_entropy, classes, 1e-8)
    text = ((ids, mask), F.cross_entropy, classes, 1e-8)
    return {
        "timm resnet10t": (_timm("resnet10t"),) + image,
        "timm mobilenetv3_small_050": (_timm("mobilenetv3_small_050"),) + image,
        "timm efficientnet_b0": (_timm("efficientnet_b0"),) + image,
        "timm convnext_atto": (_timm("convnext_atto"),) + image,
        "timm regnetx_002": (_timm("regnetx_002"),) + image,
        "timm densenet121": (_timm("densenet121"),) + image,
        "timm vit_tiny (32 px, 8 px patches)": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8),) + image,
        "timm mixer_s32 (32 px)": (_timm("mixer_s32_224", img_size=32),) + image,
        "transformers BERT": (_text("bert"),) + text,
        "transformers RoBERTa": (_text("roberta"),) + text,
        "transformers DistilBERT": (_text("distilbert"),) + text,
        "transformers GPT-2 classifier": (_text("gpt2"),) + text,
        "transformers Llama classifier": (_text("llama"), (ids, mask), F.cross_entropy, classes, 1e-6),
        "transformers GPT-2 next-token loss": (_text("gpt2_lm"), ids, _next_token_loss, ids, 1e-8),
        "transformers Wav2Vec2 + CTC loss": (_wav2vec2, audio, _ctc_loss, labels, 1e-8),
    }


def _call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _torch_grad(model, x, loss, y, params, create_graph=False):
    value = loss(torch.squeeze(_call(model, x)), torch.squeeze(y))
    return _flat(torch.autograd.grad(value, params, create_graph=create_graph, allow_unused=True,
                                     materialize_grads=True))


def reference_products(model, x, loss, y, V, differences: bool):
    """[D, P] products of torch's Hessian (reverse over reverse) or, with ``differences``, central
    differences of torch's gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        if not differences:
            g = _torch_grad(model, x, loss, y, params, create_graph=True)
            return torch.stack([_flat(torch.autograd.grad(g @ v, params, retain_graph=True, allow_unused=True,
                                                          materialize_grads=True)) for v in V])
        theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
        rows, step = [], 1e-5
        try:
            for v in V:
                sides = []
                for sign in (1, -1):
                    torch.nn.utils.vector_to_parameters(theta + sign * step * v, params)
                    sides.append(_torch_grad(model, x, loss, y, params))
                rows.append((sides[0] - sides[1]) / (2 * step))
        finally:
            torch.nn.utils.vector_to_parameters(theta, params)
        return torch.stack(rows)


def reference_mixed(model, x, loss, y, V, points: int, differences: bool):
    """[D, points, *x_i]: ∇x_i (v_d · ∇θ ℓ_i), each point's loss as a batch of one: torch's reverse over
    reverse, or with ``differences`` central differences along v_d of torch's gradient in x_i (the
    same mixed derivative, taken the other way)."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    out = torch.zeros(V.shape[0], points, *x.shape[1:], dtype=x.dtype)

    def input_grad(i):
        xi = x[i:i + 1].clone().requires_grad_(True)
        return torch.autograd.grad(loss(_call(model, xi), y[i:i + 1]), xi)[0][0]

    with sdpa_kernel(SDPBackend.MATH):
        for i in range(points):
            if not differences:
                xi = x[i:i + 1].clone().requires_grad_(True)
                g = _flat(torch.autograd.grad(loss(_call(model, xi), y[i:i + 1]), params, create_graph=True,
                                              allow_unused=True, materialize_grads=True))
                for d, v in enumerate(V):
                    out[d, i] = torch.autograd.grad(g @ v, xi, retain_graph=True)[0][0]
                continue
            step = 1e-5
            try:
                for d, v in enumerate(V):
                    sides = []
                    for sign in (1, -1):
                        torch.nn.utils.vector_to_parameters(theta + sign * step * v, params)
                        sides.append(input_grad(i))
                    out[d, i] = (sides[0] - sides[1]) / (2 * step)
            finally:
                torch.nn.utils.vector_to_parameters(theta, params)
    return out


def reference_per_sample(model, x, loss, y, points: int):
    params = [p for p in model.parameters() if p.requires_grad]
    one = [tuple(t[i:i + 1] for t in x) if isinstance(x, tuple) else x[i:i + 1] for i in range(points)]
    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([_flat(torch.autograd.grad(loss(_call(model, xi), y[i:i + 1]), params, allow_unused=True,
                                                      materialize_grads=True)) for i, xi in enumerate(one)])


def _gap(got, want) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def _cell(gap: float, threshold: float) -> str:
    return f"{gap:.1e}" if gap <= threshold else f"**{gap:.1e} (over {threshold:.0e})**"


def check(name, make, x, loss, y, threshold):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = make().double().eval()
    with torch.no_grad():  # off the kinks where zero-initialised weights put activations (timm's zero_init_last)
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    V = torch.randn(2, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / P ** 0.5
    routed = any(uses_weight_norm(m) or isinstance(m, nn.Hardsigmoid) for m in model.modules())
    want = reference_products(model, x, loss, y, V, differences=routed)
    limit = max(threshold, 1e-6) if routed else threshold
    before = copy.deepcopy(model.state_dict())
    td = TorchTwiceDifferentiable(model, loss)
    cells = []
    for engine in ENGINES:
        try:
            cells.append(_cell(_gap(td.hvp(x, y, V, engine=engine), want), limit))
        except Exception as exc:  # noqa: BLE001 - the table says what failed
            cells.append(f"**{type(exc).__name__}: {str(exc)[:80]}**")
    points = 2
    xs = tuple(t[:points] for t in x) if isinstance(x, tuple) else x[:points]
    try:
        got = torch.cat([g.reshape(points, -1) for g in per_sample_grads(td, xs, y[:points])], 1)
        cells.append(_cell(_gap(got, reference_per_sample(model, x, loss, y, points)), threshold))
    except Exception as exc:  # noqa: BLE001
        cells.append(f"**{type(exc).__name__}: {str(exc)[:80]}**")
    if isinstance(x, tuple) or not x.is_floating_point():
        cells.append("— (token ids)")
    else:  # perturbation influences: ∇x∇θ products of each point
        try:
            got = per_sample_mixed_products(td, xs, y[:points], V)
            cells.append(_cell(_gap(got, reference_mixed(model, x, loss, y, V, points, routed)), limit))
        except Exception as exc:  # noqa: BLE001
            cells.append(f"**{type(exc).__name__}: {str(exc)[:80]}**")
    after = model.state_dict()
    cells.append("as found" if all(torch.equal(before[k], after[k]) for k in before) else "**changed**")
    reference = "differences of torch's gradient" if routed else "torch, reverse over reverse"
    return f"| {name} | {P:,} | {reference} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="substrings of the model names to run")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import timm
    import transformers
    lines = [harness.header("Architectures from timm and transformers through every engine", torch.get_num_threads()),
             "",
             f"timm {timm.__version__}, transformers {transformers.__version__}; float64; batch of {N}; two "
             f"directions; compiled backend {os.environ['TWICEDIFF_COMPILE_BACKEND']}.",
             "",
             "Command: `" + " ".join(["python"] + sys.argv) + "`",
             "",
             "| model | P | reference | " + " | ".join(ENGINES) + " | per-sample | ∇x∇θ | model after | s |",
             "|---|---|---|" + "---|" * (len(ENGINES) + 4)]
    harness.emit("\n".join(lines))
    for name, (make, x, loss, y, threshold) in cases().items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        row = check(name, make, x, loss, y, threshold)
        lines.append(row)
        harness.emit(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
