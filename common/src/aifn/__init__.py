"""Shared code for the Cloud Run AI functions: settings, errors, validation, logs, model, HTTP."""

__version__ = "0.1.0"
