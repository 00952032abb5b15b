"""A command group that imports a command's module only when that command runs.

Every `cachepoint` and `cachepoint-coordinator` run is a new process, and importing every command's
module (the capture engine, the NBD server, PostgreSQL's driver...) cost more than most commands
themselves: `cachepoint status` spent most of its second importing what it never called. A group
lists its commands by name with the module and attribute that define them; `--help` imports them
all (it shows their help lines), a command imports its own.
"""

from __future__ import annotations

import importlib

import click

from cachepoint.cli.anywhere import OptionsAnywhereGroup


class LazyGroup(OptionsAnywhereGroup):
    """``lazy``: command name -> "package.module:attribute" of the click command defining it."""

    def __init__(self, *args: object, lazy: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            self.add_command(self.load(name), name)
        return super().get_command(ctx, name)

    def load(self, name: str) -> click.Command:
        module, _, attribute = self.lazy[name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command) or command.name != name:
            # The table and the module disagree: a programming error, named for whoever edits either.
            raise RuntimeError(f"{self.lazy[name]} is not the click command {name!r}")
        return command
