"""Argument types the bench scripts share."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """``1,8,16`` -> [1, 8, 16]."""
    return [int(item) for item in text.split(",")]


def env_assignment(text: str) -> tuple[str, str]:
    """``VAR=value`` -> (VAR, value), for ``--env``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected VAR=value, got {text!r}")
    return name, value
