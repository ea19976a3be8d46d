"""The command lists of --help (and of the man page help2man makes from
it) give each command a whole line: click cuts a long docstring's first
sentence at the width with "...", so each command names its own
short_help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from agent.cli import cli


def _groups(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _groups(cmd, (*path, name))
    return out


@pytest.mark.parametrize("path", _groups(cli), ids=lambda p: " ".join(p) or "zdd-agent")
def test_each_command_in_a_help_list_has_a_whole_line(path: tuple[str, ...]) -> None:
    group = cli
    for name in path:
        group = group.commands[name]
    r = CliRunner().invoke(cli, [*path, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    listed = r.output.split("\nCommands:\n", 1)[1].splitlines()
    # one line a command, none wrapped or cut
    assert len(listed) == len(group.commands), listed
    assert [line.split()[0] for line in listed] == sorted(group.commands)
    for line in listed:
        assert not line.rstrip().endswith("..."), line
        name = line.split()[0]
        summary = group.commands[name].get_short_help_str(limit=1000)
        assert line.split(None, 1)[1] == summary, name
