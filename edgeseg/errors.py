"""User-facing errors: the CLI prints their message on one line and exits with code 2."""
from __future__ import annotations


class EdgesegError(Exception):
    """A problem with the user's input (files, names, settings), not a bug in edgeseg."""


class DatasetError(EdgesegError):
    """A dataset folder or file is missing, misnamed, unreadable or inconsistent."""


class CheckpointError(EdgesegError):
    """A checkpoint is missing, corrupt, or does not match the requested preset."""


class ImageReadError(DatasetError):
    """An image file is not a regular file, cannot be decoded, is truncated or is too large."""


class SettingsError(EdgesegError):
    """A setting (training number, option, settings file entry) has the wrong type or is out of range,
    or cannot change when a run is resumed."""


class RunFolderError(EdgesegError):
    """A run folder exists, is missing, or is in use by another process (its lock file)."""


class ExportError(EdgesegError):
    """An export cannot be written (output path taken, bad sidecar) or failed its checks."""


class UnverifiedWeightsWarning(UserWarning):
    """A checkpoint loaded without a recorded sha256 of its weights (nothing to verify them against)."""
