"""Every bad input in the catalogue (tests/bad_inputs.py, the table in docs/bad_inputs.md) raises the
expected exception with a message that names what is wrong."""
import pytest

from bad_inputs import CASES, outcome


@pytest.mark.parametrize("where, what, call, expected, words", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_gets_a_clear_error(where, what, call, expected, words):
    exc, message = outcome(call)
    assert exc is not None and issubclass(exc, expected), f"{where}, {what}: got {exc} {message}"
    for word in words:
        assert word in message, f"{where}, {what}: {word!r} not in {message!r}"


@pytest.mark.parametrize("name, value", [("TWICEDIFF_CPU_BLOCK_CACHE", "yes"), ("TWICEDIFF_CPU_GEMM", "mkl"),
                                         ("TWICEDIFF_ENGINE", "fastest")])
@pytest.mark.parametrize("engine", ["auto", "native", "func"])
def test_a_bad_setting_is_not_blamed_on_the_data(name, value, engine, monkeypatch):
    """The engines' environment settings are checked before the batch is: the error names the
    variable, not "the model or loss failed on x ..."."""
    import torch

    from bad_inputs import _data, _mlp

    monkeypatch.setenv(name, value)
    if name == "TWICEDIFF_ENGINE" and engine != "auto":
        pytest.skip("TWICEDIFF_ENGINE stands in for engine='auto' only")
    with pytest.raises(ValueError) as info:
        _mlp().hvp(*_data(), torch.randn(26), engine=engine)
    assert name in str(info.value) and "failed on" not in str(info.value), str(info.value)
