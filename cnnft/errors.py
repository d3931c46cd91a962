"""Errors raised on bad input. Each message names the file, key or value and what was expected."""


class CnnftError(Exception):
    """Base class of all cnnft input errors."""


class DataError(CnnftError, ValueError):
    """A data root, annotation or image is missing or malformed."""


class CorruptImageError(DataError):
    """An image file exists but cannot be decoded."""


class ConfigError(CnnftError, ValueError):
    """A configuration value (freeze scheme, layer name, ...) is invalid."""


class CheckpointError(CnnftError, ValueError):
    """A checkpoint is not a cnnft checkpoint or does not match the model."""
