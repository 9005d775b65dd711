"""Libra's processors."""
