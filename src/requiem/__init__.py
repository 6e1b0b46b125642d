"""Requiem: run commands so that the same request always gives the same, provable answer."""

__version__ = "0.1.0"
