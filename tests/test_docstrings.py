"""The runnable examples in public docstrings (doctest): they must stay true."""
import doctest
import importlib

import pytest
import torch

import twicediff

MODULES = ["twicediff.ops.pack", "twicediff.torch.twice_differentiable"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"twicediff": twicediff, "torch": torch},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
