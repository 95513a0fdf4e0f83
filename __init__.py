"""Bouncer: an on-device guard runtime for AI inspection cameras."""

__version__ = "0.1.0"
