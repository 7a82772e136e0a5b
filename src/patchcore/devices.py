"""Which device scores: the one check of a device name, for the estimator, the runtime and every front end.

Torch is imported only to ask it about CUDA, and only when it is installed: an install that serves exported
models (onnxruntime, no torch) asks onnxruntime instead.
"""

from __future__ import annotations

from .core.threads import threads
from .errors import PatchCoreError


def _cuda_count() -> int | None:
    """CUDA GPUs that torch can use; None where torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, name: str = "device") -> None:
    """Raise PatchCoreError, one line, for a device name that is wrong or that this machine cannot give: a CUDA
    device without a GPU is said here, not as a CUDA traceback (``name``: how the caller's users spell it)."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise PatchCoreError(f"{name} must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not str(device).startswith("cuda"):
        return
    count = _cuda_count()
    if count is None:  # no torch: the runtime's onnxruntime scores
        try:
            import onnxruntime as ort
        except ImportError:
            return
        count = 1 if "CUDAExecutionProvider" in ort.get_available_providers() else 0
    if count == 0:
        raise PatchCoreError(f"{name} {device}: this machine has no CUDA GPU that patchcore can use; "
                             f"use {name} cpu (or auto, which takes a GPU when there is one)")
    index = str(device).partition(":")[2]
    if index and (not index.isdigit() or int(index) >= count):
        raise PatchCoreError(f"{name} {device}: there are {count} CUDA GPU(s) here")


def apply_torch_threads() -> None:
    """Give torch the process's thread decision (:func:`threads`), if there is one."""
    n = threads()
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
