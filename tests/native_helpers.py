"""Test helpers over the public engine API (twicediff.torch.engines)."""
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
