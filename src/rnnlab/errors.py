"""Exceptions with messages meant for users: each names the file, line or key at fault."""


class RnnlabError(Exception):
    """Base class for errors that should reach the user as a clear one-line message."""


class ConfigError(RnnlabError):
    """A params key is unknown, missing, ill-typed or out of range."""


class DataError(RnnlabError):
    """A corpus file is malformed (encoding, alignment, empty split, missing image...)."""


class DownloadError(RnnlabError):
    """A corpus could not be fetched or failed verification."""


class TrainingError(RnnlabError):
    """Training diverged (NaN/inf loss) or cannot proceed."""
