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


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """ " Did you mean 'x'?" naming the choice closest to `name` (after `prefix`), or "" when none is close.

    Example:
        >>> did_you_mean("rnak", ["rank", "alpha"])
        " Did you mean 'rank'?"
    """
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {prefix + near[0]!r}?" if near else ""
