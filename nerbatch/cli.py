"""The `nerbatch` command line: thin click commands over the stage modules."""

from __future__ import annotations

import click

from nerbatch import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nerbatch")
def main() -> None:
    """Train a transformer NER model and annotate large Parquet corpora with it."""
