"""Embedded worlds: data the project generates itself, deterministic from a seed."""
