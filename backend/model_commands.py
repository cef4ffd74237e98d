"""Subcommands of `imface` that use a trained model (fit, extract, decode, evaluate)."""
from __future__ import annotations

import argparse


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Register the model subcommands on the `imface` parser."""
