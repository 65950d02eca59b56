"""Integrations with optional dependencies, one module each (``integrations.torch``, ...).

Importing this package imports none of them.
"""
