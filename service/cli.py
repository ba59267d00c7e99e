"""The operator CLI: `chargeshare serve|migrate|owner|partner|stack`."""

from __future__ import annotations

import typer

from service.commands import owner, partner, run, stack

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(owner.app, name="owner", help="Owner accounts (vehicles and apps).")
app.add_typer(partner.app, name="partner", help="Partner accounts, keys and webhooks.")
app.add_typer(stack.app, name="stack", help="The project-local stack of `make up`.")
run.register(app)


def main() -> None:
    """Run the CLI."""
    app()
