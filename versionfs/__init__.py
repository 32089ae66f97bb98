"""versionfs: the history of data as ordinary read-only directories."""

__version__ = "0.1.0"
