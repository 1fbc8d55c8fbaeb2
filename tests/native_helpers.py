"""Test helpers over the public engine API (twicediff.torch.engines)."""
import torch

from twicediff.errors import NotNativeError
from twicediff.torch.engines import NativeEngine


def build_native_engine(model, loss):
    """(NativeEngine, "") when the native engine takes model and loss, else (None, the reason)."""
    try:
        return NativeEngine(model, loss), ""
    except NotNativeError as exc:
        return None, str(exc)


def native_hvp(engine, x, y, v, mode="hessian"):
    """The engine's products on (x, y): prepare the batch, apply to v [D, P]."""
    return engine.apply(engine.prepare(x, y), v, mode)


def op_case(device, dtype, n, d, widths, biases, chains, loss, gen):
    """Random arguments of the mlp_hvp op (x, target, weights, biases, v), drawn in float64 from
    ``gen`` and cast to ``dtype`` on ``device``: the same draw for every dtype and device."""
    weights = [torch.randn(o, i, generator=gen, dtype=torch.float64) / max(i, 1) ** 0.5
               for i, o in zip(widths[:-1], widths[1:])]
    bs = [torch.randn(w.shape[0], generator=gen, dtype=torch.float64) if b else None for w, b in zip(weights, biases)]
    P = sum(w.numel() + (b.numel() if b is not None else 0) for w, b in zip(weights, bs))
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    C = widths[-1]
    if loss == "cross_entropy":
        target = torch.randint(0, max(C, 1), (n,), generator=gen)
    else:
        target = torch.rand(n, C, generator=gen, dtype=torch.float64)
    v = torch.randn(d, P, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else (t.to(device, dtype) if t.is_floating_point() else t.to(device))
    return cast(x), cast(target), [cast(w) for w in weights], [cast(b) for b in bs], cast(v)
