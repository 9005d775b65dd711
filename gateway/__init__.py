"""Libra's gateway."""
