"""Requiem: the same request always gives the same, provable answer."""

__version__ = "0.1.0"
