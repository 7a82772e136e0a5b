"""patchcore: paper-exact PatchCore anomaly detection that fits from good images only."""

import os

__version__ = "0.1.0"

# torch and faiss each bring their own OpenMP runtime; with the default spin-waiting, the idle one's threads
# burn the cores the busy one needs (measured: inference 10-20x slower on 2 cores). Must be set before either
# runtime starts, so here; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS spins its idle threads for 2^28 cycles (~0.1 s) after every threaded product; the map's few
# products an image then kept a second core busy for ~120 ms after each answer of the service. 2^4: sleep at once.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .core.prediction import Prediction  # noqa: E402
from .core.threads import decide as _decide_threads  # noqa: E402
from .errors import BackboneError, DatasetError, ImageError, ModelFileError, NotFittedError, PatchCoreError  # noqa: E402

# PATCHCORE_THREADS, the process's one thread decision, must reach OpenMP and BLAS before they start: here.
try:
    _decide_threads()
except PatchCoreError:
    pass  # a bad value is said where it is used (patchcore.core.threads.threads)


def __getattr__(name: str):
    # PatchCore needs torch; importing it lazily lets the torch-free runtime (patchcore.runtime) import
    # this package on a machine without torch.
    if name == "PatchCore":
        try:
            from .model import PatchCore
        except ModuleNotFoundError as e:
            from .entry import FULL  # what the "full" extra brings beyond the bare install

            if (e.name or "").split(".")[0] not in FULL:
                raise
            raise ImportError(f"PatchCore (fitting, the PyTorch path) needs the full install, and {e.name} is "
                              f"missing: pip install \"patchcore[full]\". This install scores exported models: "
                              f"from patchcore import runtime") from None
        return PatchCore
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")


__all__ = ["PatchCore", "Prediction", "PatchCoreError", "ImageError", "DatasetError", "BackboneError",
           "ModelFileError", "NotFittedError", "__version__"]
