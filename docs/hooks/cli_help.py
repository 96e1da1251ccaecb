"""MkDocs hook: the ``qmpc`` command line's help, generated from its argparse parser.

A page that contains ``<!-- qmpc-cli-help -->`` gets, in its place, one section per subcommand
with the output of ``qmpc <command> --help`` (wrapped at 100 columns), so the reference cannot
drift from ``qmpc/cli.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- qmpc-cli-help -->"
ROOT = Path(__file__).resolve().parents[2]


def cli_help() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # document this checkout's parser
    from qmpc.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parts = [f"```text\n{parser.format_help()}```"]
        for name, p in sub.choices.items():
            parts.append(f"## qmpc {name}\n\n```text\n{p.format_help()}```")
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, cli_help()) if MARKER in markdown else markdown
