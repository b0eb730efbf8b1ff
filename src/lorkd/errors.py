"""The exceptions lorkd raises on purpose.

Every error a user can cause (bad config, bad data file, bad task id) is one of these, and its
message names the file, key, field or value at fault. All of them subclass ``ValueError`` so that
callers who only know the standard library can still catch them.
"""


class LorkdError(ValueError):
    """Base class of lorkd's user-facing errors."""


class ConfigError(LorkdError):
    """A configuration key is missing, unknown, or has a value of the wrong type or range."""


class DataError(LorkdError):
    """An input file is missing, unreadable, truncated, or holds fields of the wrong shape or range."""


class TrainingError(LorkdError):
    """Training cannot go on (for example a non-finite loss); the message names step and task."""
