"""A click group whose own options may also follow the subcommand: `cachepoint ls --store X` is
`cachepoint --store X ls`, and `cachepoint-coordinator serve ... --identity DIR` likewise.

Before click parses, such an option met after the subcommand is moved in front of it, unless the
subcommand (or, for a subgroup, any command under it) has an option of that name itself, which then
keeps it (`cachepoint enroll --identity DIR`, `cachepoint-coordinator serve --config FILE`). Everything
after a ``--`` stays where it is.
"""

from __future__ import annotations

import click


def _option_names(command: click.Command) -> set[str]:
    names = {name for param in command.params if isinstance(param, click.Option) for name in param.opts}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= _option_names(sub)
    return names


class OptionsAnywhereGroup(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._lifted(ctx, list(args)))

    def _lifted(self, ctx: click.Context, args: list[str]) -> list[str]:
        own = {
            name: not param.is_flag
            for param in self.params
            if isinstance(param, click.Option)
            for name in param.opts
            if name.startswith("--")
        }  # name -> takes a value
        at = 0
        while at < len(args) and args[at].startswith("-") and args[at] != "--":
            at += 2 if own.get(args[at]) else 1
        if at >= len(args) or args[at] == "--":
            return args
        command = self.get_command(ctx, args[at])
        if command is None:
            return args  # click names the unknown command
        liftable = {name for name in own if own[name]} - _option_names(command)
        front, rest, index = [], args[: at + 1], at + 1
        while index < len(args):
            token = args[index]
            if token == "--":
                rest += args[index:]
                break
            name = token.split("=", 1)[0]
            if name in liftable and "=" in token:
                front.append(token)
            elif token in liftable and index + 1 < len(args):
                front += [token, args[index + 1]]
                index += 1
            else:
                rest.append(token)
            index += 1
        return args[:at] + front + rest[at:]
