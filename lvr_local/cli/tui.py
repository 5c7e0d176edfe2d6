"""`lvr tui`: the terminal chat app, as a command of the `lvr` group."""

from __future__ import annotations

import click

from lvr_local import interrupts


@click.command()
@click.option(
    "--max-pieces",
    type=click.IntRange(min=1),
    help="Length limit of each reply, in pieces (default from models.toml).",
)
@click.pass_context
def tui(ctx: click.Context, max_pieces: int | None) -> None:
    """Chat with the ensemble in a full-screen terminal app."""
    from lvr_tui.app import LvrApp  # textual is only imported when the app runs

    config_path = ctx.find_root().obj.get("config_path")
    interrupts.uninstall()  # the app handles its keys; SIGTERM ends it as before
    LvrApp(config_path, max_pieces=max_pieces).run()
