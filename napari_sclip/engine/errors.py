"""Exceptions the engine raises for problems a user can fix.

Each message is one line that says what is wrong and, where possible, what to do about it; the CLI
and the napari widget show it as is, without a traceback.
"""


class SclipError(Exception):
    """Base class of napari-sclip's user-facing errors."""


class VocabularyError(SclipError, ValueError):
    """The class list is empty, blank, or names a class twice."""


class ImageError(SclipError, ValueError):
    """The image cannot be segmented as given (shape, channels, values)."""


class ParameterError(SclipError, ValueError):
    """A segmentation parameter is out of range."""


class ModelError(SclipError):
    """The model or its weights cannot be found, downloaded or loaded."""


class DeviceError(SclipError):
    """The requested device is unknown or not available."""


class ActivationWarning(UserWarning):
    """The weights do not say which MLP activation (QuickGELU or GELU) they were trained with, so
    the model config's was used; ``quick_gelu=True/False`` chooses and silences it."""
