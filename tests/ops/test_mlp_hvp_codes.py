"""The activation, loss and reduction codes of mlp_hvp are defined once on each side of the op: the
C++ enums (csrc/mlp_hvp_codes.h, exposed by the op ``twicediff::mlp_hvp_codes``) and the Python
wrapper's tables. These tests hold the two to each other, name for name and code for code."""
import json

import pytest
import torch

import twicediff  # noqa: F401  (loads the extension and its ops)
from twicediff.ops.mlp_hvp import LOSSES, REDUCTIONS, activation_codes
from twicediff.ops.mlp_hvp import native_codes as read_native_codes


@pytest.fixture(scope="module")
def native_codes():
    codes = read_native_codes()
    assert codes == json.loads(torch.ops.twicediff.mlp_hvp_codes())
    return codes


def test_native_codes_have_the_three_tables(native_codes):
    assert set(native_codes) == {"activations", "losses", "reductions"}


@pytest.mark.parametrize("native_key, python_table", [("activations", activation_codes()),
                                                      ("losses", LOSSES), ("reductions", REDUCTIONS)])
def test_python_table_equals_the_native_one(native_codes, native_key, python_table):
    assert python_table == native_codes[native_key], (
        f"twicediff.ops.mlp_hvp's {native_key} {python_table} differ from the C++ codes {native_codes[native_key]} "
        f"(csrc/mlp_hvp_codes.h)")

