"""Libra's own tools, registered through the ``libra.tools`` entry points like any plugin's."""
