"""patchcore: paper-exact PatchCore anomaly detection that fits from good images only."""

__version__ = "0.1.0"

from .errors import (BackboneError, DatasetError, ImageError, ModelFileError,  # noqa: E402
                     NotFittedError, PatchCoreError)
from .model import PatchCore, Prediction  # noqa: E402

__all__ = ["PatchCore", "Prediction", "PatchCoreError", "ImageError", "DatasetError", "BackboneError",
           "ModelFileError", "NotFittedError", "__version__"]
