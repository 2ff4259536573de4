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
