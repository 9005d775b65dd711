"""Tools the model may call, and the plugins that add them (entry point group ``libra.tools``).

A plugin is a Python package whose entry point in the ``libra.tools`` group names a
:class:`Tool` (or a list of them)::

    [project.entry-points."libra.tools"]
    weather = "libra_weather:weather"

and ``libra tools`` lists it once installed. Libra's own tools are declared the same way.
"""

from .base import Access, Tool, ToolContext, ToolError

__all__ = ["Access", "Tool", "ToolContext", "ToolError"]
