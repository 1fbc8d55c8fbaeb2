"""Shared fixtures: every device check is written once and run per device. The test helpers in this
folder and the benchmark scripts' harness (benchmarks/harness.py) are importable from every test."""
import os
import sys

import pytest
import torch

import twicediff

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.join(os.path.dirname(_HERE), "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

DEVICES = ["cpu"] + (["cuda"] if twicediff.build_info()["gpu_available"] else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes ``device`` runs on the CPU and, when a GPU is present, on CUDA."""
    return torch.device(request.param)
