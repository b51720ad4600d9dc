"""The Triton backend under the name models/neurons.py imports: the package models/triton/ does the work."""

from .triton import _INTERPRETED, HARD_RESET, backward, forward  # noqa: F401
