"""Libra's ops."""
