"""Executables the agent runs as root must be root's alone (StrictModes),
checked on real files and directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.trust import check_root_argv, untrusted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def script(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(path, mode)
    return path


def test_a_root_owned_hook_in_root_owned_directories_is_trusted(root_dir: Path) -> None:
    assert untrusted(str(script(root_dir / "hook"))) is None
    assert untrusted("/bin/true") is None


@pytest.mark.parametrize("mode, owner, expect", [
    (0o775, 0, "the file {f} is writable by group or others (mode 0775)"),
    (0o757, 0, "the file {f} is writable by group or others (mode 0757)"),
    (0o755, 65534, "the file {f} is owned by uid 65534, not root"),
])
def test_a_hook_others_could_change_is_refused(root_dir: Path, mode: int, owner: int,
                                               expect: str) -> None:
    f = script(root_dir / "hook", mode)
    os.chown(f, owner, 0)
    assert untrusted(str(f)) == expect.format(f=f)
    with pytest.raises(ConfigError) as e:
        check_root_argv([str(f)], "hooks.pre_swap.command", "/etc/zdd-agent/services/a.yaml")
    assert str(e.value).startswith("/etc/zdd-agent/services/a.yaml: hooks.pre_swap.command: "
                                   f"{f} runs as root, but ")
    assert "chmod go-w" in str(e.value) and e.value.details["key"] == "hooks.pre_swap.command"


def test_a_directory_on_the_way_that_others_can_write_is_refused(root_dir: Path) -> None:
    d = root_dir / "hooks"
    d.mkdir()
    f = script(d / "hook")
    os.chmod(d, 0o777)
    assert untrusted(str(f)) == f"directory {d} is writable by group or others (mode 0777)"
    os.chmod(d, 0o755)
    os.chown(d, 65534, 65534)
    assert untrusted(str(f)) == f"directory {d} is owned by uid 65534, not root"
    # /tmp: world-writable even with its sticky bit
    assert "directory /tmp is writable" in (untrusted("/tmp") or "x /tmp").replace(
        "the file /tmp", "directory /tmp")


def test_a_symlink_is_judged_by_what_it_points_at(root_dir: Path) -> None:
    other = root_dir / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    target = script(other / "hook")
    link = root_dir / "hook"
    link.symlink_to(target)
    assert untrusted(str(link)) == f"directory {other} is owned by uid 65534, not root"
    assert untrusted(str(root_dir / "missing")) == \
        f"{root_dir / 'missing'}: No such file or directory"


def test_what_the_services_user_cannot_run_is_told_before_the_start(root_dir: Path) -> None:
    from agent.trust import cannot_execute

    assert cannot_execute("/bin/true", "nobody") is None
    assert cannot_execute("/bin/true", "no-such-user-here") == "no such user 'no-such-user-here'"
    private = root_dir / "private"
    private.mkdir()
    os.chmod(private, 0o700)
    interp = script(private / "python3")
    assert cannot_execute(str(interp), "nobody") == \
        f"directory {private} is not searchable by nobody"
    # a script whose interpreter sits where the user cannot reach (a
    # virtualenv under /root: the e2e suite met it as 203/EXEC)
    app = root_dir / "api"
    app.write_text(f"#!{interp}\nprint('hi')\n")
    os.chmod(app, 0o755)
    assert cannot_execute(str(app), "nobody") == \
        f"directory {private} is not searchable by nobody"
    os.chmod(private, 0o755)
    assert cannot_execute(str(app), "nobody") is None
    os.chmod(app, 0o711)
    assert cannot_execute(str(app), "nobody") == f"{app} is a script nobody cannot read"
    os.chmod(app, 0o744)
    assert cannot_execute(str(app), "nobody") == f"{app} is not executable by nobody"
    assert cannot_execute(str(app), "root") is None


def test_what_runs_as_root_is_checked_whole_and_for_any_name_of_root(root_dir: Path) -> None:
    """Review of issue 13: `user: root` skipped the check, and only argv[0]
    was checked, so `/bin/sh <a script anyone can write>` ran as root."""
    from agent.config import Hook, Listen, Ready, ServiceConfig
    from agent.deploy import preflight

    open_dir = root_dir / "open"
    open_dir.mkdir()
    hook = script(open_dir / "hook.sh", 0o777)
    os.chown(hook, 65534, 65534)

    def svc(user: str | None, argv: tuple[str, ...], probe: bool = False) -> ServiceConfig:
        ready = Ready(type="exec", command=argv) if probe else Ready()
        hooks = () if probe else (("pre_swap", Hook(argv, 5.0)),)
        return ServiceConfig(name="api", command=("/bin/true",),
                             listen=(Listen("127.0.0.1", 8080),), path=Path("/x/api.yaml"),
                             user=user, hooks=hooks, ready=ready)

    for user in (None, "root"):
        for argv in ((str(hook),), ("/bin/sh", str(hook)), ("/bin/sh", "-c", "x", str(hook))):
            for probe in (False, True):
                with pytest.raises(ConfigError) as e:
                    preflight(svc(user, argv, probe), "v1")
                assert f"{hook}" in str(e.value) and "owned by uid 65534" in str(e.value)
    # the same hook as a service user that is not root: its own business
    os.chmod(open_dir, 0o755)
    preflight(svc("nobody", (str(hook),)), "v1")
    # arguments that are not files (a URL, a word) are not paths to check
    preflight(svc(None, ("/bin/true", "http://127.0.0.1:8080/", "--flag", "tmp")), "v1")
    # a relative path is relative to /, where the transient unit runs
    rel = str(hook).lstrip("/")
    os.chmod(open_dir, 0o777)
    with pytest.raises(ConfigError, match=f"directory {open_dir} is writable"):
        preflight(svc(None, ("/usr/bin/env", "sh", rel)), "v1")


def test_a_root_hook_that_became_writable_is_refused_at_run_time(root_dir: Path) -> None:
    """Recovery and the watch run hooks and probes without a preflight: the
    run itself refuses (nothing is started)."""
    from agent.config import Hook, Listen, ServiceConfig
    from agent.deploy import SystemdOps

    hook = script(root_dir / "hook.sh", 0o777)
    svc = ServiceConfig(name="api", command=("/bin/true",), listen=(Listen("127.0.0.1", 8080),),
                        hooks=(("on_rollback", Hook((str(hook),), 5.0)),))

    class NoSystemd:
        def run_transient(self, *a: object, **kw: object) -> tuple[bool, str]:
            raise AssertionError("nothing may be started")

    ops = SystemdOps.__new__(SystemdOps)
    ops.svc, ops.sd = svc, NoSystemd()  # type: ignore[assignment]
    ok, detail = ops.run_hook("on_rollback", {"ZDD_TO_VERSION": "v1"})  # type: ignore[misc]
    assert not ok and detail == (f"refused to run {hook} as root: the file {hook} is writable "
                                 "by group or others (mode 0777)")


def test_links_interpreters_and_directories_on_the_way_are_checked(root_dir: Path) -> None:
    """Second review of issue 13: a link in a directory others may write (they
    re-point it between the check and the exec), a root script whose #!
    interpreter others own, and a directory argument (python3 /opt/pkg runs
    its __main__.py) ran as root."""
    from agent.trust import untrusted_argv

    good = script(root_dir / "good.sh")
    open_dir = root_dir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (open_dir / "link.sh").symlink_to(good)
    assert untrusted(str(open_dir / "link.sh")) == \
        f"directory {open_dir} is writable by group or others (mode 0777)"
    (root_dir / "via.sh").symlink_to(open_dir / "link.sh")  # root's link into it
    assert "writable by group or others" in (untrusted(str(root_dir / "via.sh")) or "")
    # a root script whose interpreter is someone else's
    theirs = root_dir / "theirs"
    theirs.mkdir()
    interp = script(theirs / "interp")
    os.chown(theirs, 65534, 65534)
    shebang = root_dir / "shebang.sh"
    shebang.write_text(f"#!{interp}\n")
    os.chmod(shebang, 0o755)
    assert untrusted_argv([str(shebang)]) == \
        f"its #! line {interp}: directory {theirs} is owned by uid 65534, not root"
    # a directory argument: what is inside counts
    pkg = root_dir / "pkg"
    pkg.mkdir()
    main = pkg / "__main__.py"
    main.write_text("print('hi')\n")
    os.chmod(main, 0o666)
    assert untrusted_argv(["/usr/bin/python3", str(pkg)]) == \
        f"{pkg}: the file {main} is writable by group or others (mode 0666)"
    os.chmod(main, 0o644)
    assert untrusted_argv(["/usr/bin/python3", str(pkg)]) is None
    # a link loop is an answer, not a hang
    (root_dir / "loop").symlink_to(root_dir / "loop")
    assert untrusted(str(root_dir / "loop")) == f"{root_dir / 'loop'}: too many levels of " \
                                                "symbolic links"


def test_the_third_review_interpreter_lines_depth_trees_siblings_and_data(
        root_dir: Path) -> None:
    """Third review of issue 13: what still ran another user's file as root,
    and what was refused that should not be."""
    from agent.trust import MAX_SHEBANG, untrusted_argv, untrusted_env

    open_dir = root_dir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    evil = script(open_dir / "evil", 0o777)
    # 1. the words after the interpreter on a #! line: env's program, sh's script
    for line in (f"#!/usr/bin/env {evil}", f"#!/bin/sh {evil}"):
        s = root_dir / "shebang.sh"
        s.write_text(line + "\n")
        os.chmod(s, 0o755)
        assert "writable by group or others" in (untrusted_argv([str(s)]) or ""), line
    # 2. the kernel follows 5 levels of #!: a chain deeper than we check is refused
    prev = "/bin/true"
    for i in range(MAX_SHEBANG + 1):
        step = root_dir / f"i{i}"
        step.write_text(f"#!{prev}\n")
        os.chmod(step, 0o755)
        prev = str(step)
    assert "levels of #! interpreters to check" in (untrusted_argv([prev]) or "")
    # 3./4. what a script imports is not followed (documented): a linked
    # directory beside it, a module beside it; the script itself is checked
    py = root_dir / "py"
    py.mkdir()
    (py / "x.py").write_text("import json\n")
    shadow = py / "json.py"
    shadow.write_text("")
    os.chown(shadow, 65534, 65534)
    assert untrusted_argv(["/usr/bin/python3", str(py / "x.py")]) is None
    os.chown(py / "x.py", 65534, 65534)
    assert untrusted_argv(["/usr/bin/python3", str(py / "x.py")]) == \
        f"{py / 'x.py'}: the file {py / 'x.py'} is owned by uid 65534, not root"
    # data, not code: the arguments of a program that is not an interpreter,
    # devices, URLs; and env(1) finding python3 on PATH
    assert untrusted_argv(["/usr/bin/curl", "-sf", "-o", "/dev/null",
                           "http://127.0.0.1:8080/"]) is None
    assert untrusted_argv(["/usr/bin/find", "/tmp", "-name", "x"]) is None
    assert untrusted_argv(["/usr/bin/env", "python3", "-m", "json.tool", "/dev/null"]) is None
    assert untrusted_argv(["/bin/sh", "-c", "echo hi", "/dev/null"]) is None
    # the environment a root hook gets
    assert untrusted_env({"PYTHONPATH": f"/usr/lib:{open_dir}"}) == (
        "PYTHONPATH", f"{open_dir}: directory {open_dir} is writable by group or others "
                      "(mode 0777)")
    assert untrusted_env({"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "/tmp"}) is None


def test_preflight_fills_in_the_version_and_checks_the_environment(root_dir: Path) -> None:
    """A post_start hook under /releases/{version}/ was refused as missing;
    a PYTHONPATH into a directory others may write was passed to root hooks."""
    from agent.config import Hook, Listen, ServiceConfig
    from agent.deploy import preflight

    (root_dir / "v7").mkdir()
    script(root_dir / "v7" / "warm.sh")
    hook = Hook((f"{root_dir}/{{version}}/warm.sh", "{instance_port}"), 5.0)
    svc = ServiceConfig(name="api", command=("/bin/true",), listen=(Listen("127.0.0.1", 8080),),
                        path=Path("/x/api.yaml"), hooks=(("post_start", hook),))
    preflight(svc, "v7")
    open_dir = root_dir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    env = (("PYTHONPATH", str(open_dir)),)
    with pytest.raises(ConfigError) as e:
        preflight(ServiceConfig(**{**svc.__dict__, "environment": env}), "v7")
    assert str(e.value).startswith("/x/api.yaml: environment.PYTHONPATH: hooks and probes run "
                                   f"as root with it, but {open_dir}: directory {open_dir} is "
                                   "writable by group or others")


def test_the_fourth_review_env_options_names_missing_files_and_data(root_dir: Path) -> None:
    """Fourth review of issue 13: env options that hide the program, Debian's
    interpreter names, a script not there yet in a writable directory, an
    unreadable path, options variables; and no walk of data directories."""
    from agent.trust import INTERPRETERS, untrusted_argv, untrusted_env

    open_dir = root_dir / "w"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    evil = script(open_dir / "evil.sh", 0o777)
    for argv in (["/usr/bin/env", "-u", "curl", str(evil)],
                 ["/usr/bin/env", f"-S python3 -u {evil}"],
                 ["/usr/bin/env", f"--split-string=python3 {evil}"],
                 ["/usr/bin/env", f"-C{open_dir}", "sh", "evil.sh"]):
        assert "only -i is followed" in (untrusted_argv(argv) or ""), argv
    assert untrusted_argv(["/usr/bin/env", "-i", "A=1", "sh", str(evil)]) is not None
    for name in ("perl5.36-x86_64-linux-gnu", "python3.11-dbg", "python3.11d", "ksh93", "yash",
                 "mksh-static", "ash", "lksh", "posh", "bsd-csh", "luajit-2.1.0", "php-cgi8.2",
                 "tclsh8.6", "gawk", "busybox", "rbash"):
        assert INTERPRETERS.fullmatch(name), name
    for name in ("curl", "ssh", "systemctl", "find", "pg_isready", "rsync", "timeout"):
        assert not INTERPRETERS.fullmatch(name), name
    # a script another user could still create in time
    assert "(not there yet): directory" in (
        untrusted_argv(["/usr/bin/python3", str(open_dir / "later.py")]) or "")
    # an unreadable link on the way is a reason, never an exception
    (root_dir / "l").symlink_to("/")
    import agent.trust as trust

    real = trust.os.readlink
    try:
        def deny(p: str) -> str:
            raise PermissionError(13, "Permission denied", p)
        trust.os.readlink = deny  # type: ignore[assignment]
        assert untrusted(str(root_dir / "l" / "x")) == f"{root_dir / 'l' / 'x'}: Permission denied"
    finally:
        trust.os.readlink = real  # type: ignore[assignment]
    # data: a root script given a data file or a data directory of the app's
    hook = script(root_dir / "migrate.sh")
    data = root_dir / "appdata"
    data.mkdir()
    (data / "log").write_text("")
    os.chown(data, 65534, 65534)
    assert untrusted_argv(["/bin/sh", str(hook), "/etc/hosts", str(data)]) is None
    assert untrusted_argv(["/usr/bin/python3", "-m", "json.tool", "/etc/os-release"]) is None
    # options variables, relative PATH entries
    assert untrusted_env({"NODE_OPTIONS": "--require=/x"})[0] == "NODE_OPTIONS"  # type: ignore
    rel = str(open_dir).lstrip("/")
    assert untrusted_env({"PATH": f"{rel}:/usr/bin"}) == (
        "PATH", f"{rel}: directory {open_dir} is writable by group or others (mode 0777)")


def test_a_hook_or_probe_that_is_not_executable_is_refused_before_anything_runs(
        root_dir: Path) -> None:
    """Kept through the StrictModes rework (it was lost once): a root-owned
    hook without an execute bit, or with {version} filled in, is judged as
    the file that would run."""
    from agent.config import Hook, Listen, Ready, ServiceConfig
    from agent.deploy import preflight

    plain = script(root_dir / "hook.sh", 0o644)
    base = ServiceConfig(name="api", command=("/bin/true",), listen=(Listen("127.0.0.1", 8080),),
                         path=Path("/x/api.yaml"))
    for user in (None, "nobody"):
        hooked = ServiceConfig(**{**base.__dict__, "user": user,
                                  "hooks": (("pre_swap", Hook((str(plain),), 5.0)),)})
        with pytest.raises(ConfigError, match=f"hooks.pre_swap.command: {plain} is not an "
                                              "executable file"):
            preflight(hooked, "v1")
    probed = ServiceConfig(**{**base.__dict__,
                              "ready": Ready(type="exec", command=(str(root_dir / "{version}"),))})
    with pytest.raises(ConfigError, match=f"ready.command: {root_dir / 'v9'} is not an "):
        preflight(probed, "v9")
