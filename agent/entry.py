"""The `zdd-agent` command's entry point (pyproject's [project.scripts]).

A plain call for the daemon (`status`, `swap api --version v2`...) is sent
first, by fastpath.py, and the command line loads while the daemon works on
it (issue 16). The command line is imported only once the program runs, so
that Ctrl-C while it is still loading (click, rich: a hundred milliseconds
on a busy host) is exit 130 and one word, like Ctrl-C at any later moment,
and never a Python traceback; a swap already sent goes on in the daemon,
and the message says so."""

from __future__ import annotations

import sys


def main() -> None:
    sent = None
    try:
        from .fastpath import send

        sent = send(sys.argv[1:])
        from .cli import main as cli_main
    except KeyboardInterrupt:
        note = sent.close() if sent else ""
        sys.stderr.write(f"{note or 'interrupted'}\n")
        raise SystemExit(130) from None
    try:
        cli_main(sent)
    finally:
        note = sent.close() if sent else ""  # unclaimed: stopped before the reply
        if note:
            sys.stderr.write(f"{note}\n")


if __name__ == "__main__":  # python3 -m agent.entry (help2man in debian/rules)
    main()
