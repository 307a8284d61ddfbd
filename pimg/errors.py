"""The one exception family pimg raises for bad input.

Every message says what went wrong, which value caused it, and how to fix it, in one paragraph,
so the CLI and the demo can show it to a person without a traceback.
"""


class PimgError(Exception):
    """Base class of every error pimg raises on purpose."""


class InputError(PimgError, ValueError):
    """An argument, file or image the user gave cannot be used as it is."""


class ModelLoadError(PimgError):
    """A base model, adapter or embedding could not be found, read or matched to the base."""


class TrainingError(PimgError):
    """Training cannot start or cannot go on (too few photos, NaN loss, bad resume state)."""
