"""Shared fixtures: every device check is written once and run per device."""
import pytest
import torch

import twicediff

DEVICES = ["cpu"] + (["cuda"] if twicediff.build_info()["gpu_available"] else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes ``device`` runs on the CPU and, when a GPU is present, on CUDA."""
    return torch.device(request.param)
