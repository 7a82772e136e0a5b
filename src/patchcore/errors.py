"""The one exception family users see: every message is a single line that says what to do."""


class PatchCoreError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageError(PatchCoreError, ValueError):
    """An image could not be read or is unusable (unreadable, too small, wrong shape)."""


class DatasetError(PatchCoreError, ValueError):
    """A dataset folder is missing, empty or laid out wrongly."""


class BackboneError(PatchCoreError, RuntimeError):
    """A backbone is unknown, or its weights cannot be had."""


class ModelFileError(PatchCoreError, ValueError):
    """A saved model file is corrupt, truncated, foreign or incompatible."""


class NotFittedError(PatchCoreError, RuntimeError):
    """predict() or save() was called before fit()."""
