"""`libra tools`: the tools installed (Libra's and plugins'), and which are enabled.

Added to the `libra` command line by ``ops/cli.py``. It reads the entry point group
``libra.tools`` as the llm processor does, so what it lists is what a reply may be offered.
"""

from __future__ import annotations

import sys

import click
import msgspec

__all__ = ["tools_command"]


@click.command(name="tools")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--data-dir", type=click.Path(file_okay=False))
def tools_command(as_json: bool, data_dir: str | None) -> None:
    """List the installed tools, where each comes from, and which TOOLS_ENABLED enables
    (a Discord server's admins choose their own with /tools)."""
    from libra.tools.registry import enabled_names, installed, unknown

    from .cli import _settings

    settings = _settings(data_dir)
    found = installed()
    enabled = enabled_names(settings.tools_enabled)
    rows = [
        {
            "name": name,
            "enabled": name in enabled,
            "access": tool.access,
            "timeout_s": tool.timeout_s,
            "secrets": list(tool.secrets),
            "source": found.sources[name],
            "description": tool.description,
        }
        for name, tool in sorted(found.tools.items())
    ]
    missing = unknown(enabled, found.tools)
    if as_json:
        report = {"tools": rows, "missing": missing, "problems": list(found.problems)}
        click.echo(msgspec.json.encode(report).decode())
        return
    if not rows:
        click.echo("no tools are installed")
    width = max((len(row["name"]) for row in rows), default=4)
    for row in rows:
        state = "enabled " if row["enabled"] else "disabled"
        where = " (Discord servers only)" if row["access"] == "servers" else ""
        click.echo(
            f"{row['name']:<{width}}  {state}  {row['source']}, {row['timeout_s']:g} s{where}"
        )
        click.echo(f"{'':<{width}}  {row['description']}")
    for name in missing:
        click.echo(f"TOOLS_ENABLED names {name!r}, which is not installed", err=True)
    for problem in found.problems:
        click.echo(f"not loaded: {problem}", err=True)
    if found.problems:
        sys.exit(1)
