"""Launchers: a local multi-process job (local.py) and Cloud TPU VM pods."""
