"""Which torch device the cascade runs on, for training and inference alike."""

from __future__ import annotations

import torch

from cascade.errors import DeviceError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device named by ``device``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (the first CUDA device when one is present, else the CPU),
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    DeviceError
        A CUDA device was asked for on a machine without CUDA, or the index does not
        exist, or the name is not a device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} was asked for but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev
