"""Libra's runtime."""
