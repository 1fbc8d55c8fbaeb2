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
