"""The package version, kept in the core so that provenance needs no import from outside it."""

__version__ = "0.1.0"
