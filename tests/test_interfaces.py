"""The seed's framework-independent interfaces (twicediff.twice_differentiable)."""
import dataclasses
import typing

import pytest
import torch
from torch import nn

from twicediff.torch import TorchTensorUtilities, TorchTwiceDifferentiable
from twicediff.twice_differentiable import (
    DataLoaderType,
    InverseHvpResult,
    ModelType,
    TensorType,
    TensorUtilities,
    TwiceDifferentiable,
)


def test_type_variables_have_the_reference_bounds():
    assert isinstance(TensorType, typing.TypeVar) and TensorType.__bound__ is typing.Sequence
    assert isinstance(DataLoaderType, typing.TypeVar) and DataLoaderType.__bound__ is typing.Iterable
    assert isinstance(ModelType, typing.TypeVar)
    assert ModelType.__bound__.__forward_arg__ == "TwiceDifferentiable"


def test_inverse_hvp_result_is_frozen_and_unpacks():
    r = InverseHvpResult(x=torch.ones(3), info={"niter": 2})
    x, info = r
    assert torch.equal(x, torch.ones(3)) and info == {"niter": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.x = torch.zeros(3)
    assert typing.Generic in InverseHvpResult.__mro__


def test_twice_differentiable_is_abstract():
    with pytest.raises(TypeError):
        TwiceDifferentiable()
    abstract = TwiceDifferentiable.__abstractmethods__
    assert {"tensor_type", "num_params", "parameters", "mvp"} <= set(abstract)
    assert "grad" not in abstract and "hessian" not in abstract


def test_tensor_utilities_registry_and_factory():
    model = TorchTwiceDifferentiable(nn.Linear(2, 1).eval(), nn.functional.mse_loss)
    assert TensorUtilities.from_twice_differentiable(model) is TorchTensorUtilities
    assert TensorUtilities.registry[TorchTwiceDifferentiable] is TorchTensorUtilities

    with pytest.raises(KeyError, match="No registered TensorUtilities"):
        TensorUtilities.from_twice_differentiable(object())


def test_subclass_without_twice_differentiable_type_is_rejected():
    with pytest.raises(TypeError, match="twice_differentiable_type"):
        class Missing(TensorUtilities):  # noqa: F841
            pass
    with pytest.raises(TypeError, match="twice_differentiable_type"):
        class NotAType(TensorUtilities):  # noqa: F841
            twice_differentiable_type = "torch"
