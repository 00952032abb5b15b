"""The `cachepoint-coordinator` command."""

from __future__ import annotations

import click

from cachepoint import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachepoint-coordinator")
def cli() -> None:
    """The coordinator: catalog of layers and versions, fleet membership, origin of every block.

    Its gRPC services are defined in proto/cachepoint/v1/; the server itself is not built yet.
    """


def main() -> None:
    cli(prog_name="cachepoint-coordinator")
