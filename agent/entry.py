"""The `zdd-agent` command's entry point (pyproject's [project.scripts]).

It imports the command line only once it runs, so that Ctrl-C while the
program is still loading (click, rich, pystemd: a few hundred milliseconds
on a busy host) is exit 130 and one word, like Ctrl-C at any later moment,
and never a Python traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    cli_main()
