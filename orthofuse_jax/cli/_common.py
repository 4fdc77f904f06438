"""What every command module shares: the program name, the exit status of a bad input, its error,
and the ``--model`` option of the SDXL commands."""

from __future__ import annotations

import argparse

PROG = "orthofuse-jax"
EXIT_BAD_INPUT = 2


class CLIError(ValueError):
    """A bad command-line input; reported as one line with exit status 2."""


def add_model_option(parser: argparse.ArgumentParser, holds: str, *, hub_id: bool = False) -> None:
    """Add the required ``--model DIR`` of the SDXL commands: a local diffusers model folder,
    ``holds`` saying what the command reads from it; with ``hub_id`` also ``--hub-id``, which
    treats ``--model`` as a Hugging Face hub id to download."""
    parser.add_argument("--model", required=True, help=f"local diffusers SDXL folder ({holds})")
    if hub_id:
        parser.add_argument(
            "--hub-id", action="store_true", help="treat --model as a hub id and download it"
        )
