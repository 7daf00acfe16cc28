"""The device the cascade runs on: what ``auto`` gives and how a missing GPU is reported."""

from __future__ import annotations

import pytest
import torch

from cascade.device import resolve_device
from cascade.errors import CascadeError, DeviceError


def test_auto_is_cpu_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_cuda_is_a_device_error_not_a_training_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DeviceError, match="CUDA") as info:
        resolve_device("cuda")
    assert isinstance(info.value, CascadeError)
    assert type(info.value).__name__ != "TrainingError"


def test_a_name_that_is_no_device_is_rejected_with_the_name() -> None:
    with pytest.raises(DeviceError, match="'gpu0'"):
        resolve_device("gpu0")


def test_cpu_is_always_available() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
