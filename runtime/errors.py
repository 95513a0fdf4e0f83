"""One error type for every input the user got wrong; the CLI turns it into one line and exit code 2."""

from __future__ import annotations


class BouncerError(Exception):
    """A problem with user input (file, model, folder, option) that the user can fix."""


class ModelError(BouncerError):
    """A model file that is missing, unreadable, or lacks what Bouncer needs."""


class ImageError(BouncerError):
    """An image that cannot be decoded or has an unusable shape."""
