"""Errors a user can cause and fix. The CLI prints their message as one line, without a traceback."""


class UnlearnError(Exception):
    """A mistake the user can fix (bad path, wrong model family, bad config value...)."""


class ConversionError(UnlearnError):
    """Weights that do not fit the model: every missing, unexpected and misshaped key, listed together."""


class ModelFamilyError(UnlearnError):
    """A folder that holds a model of another family than the one asked for."""
