"""Libra's projections."""
