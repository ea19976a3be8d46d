"""unix: listeners: config validation and unit rendering (pure), and the
unix_diag census against real AF_UNIX sockets and real processes on this
machine (no mocks: which socket is whose is the kernel's answer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import deploy, doctor, listeners, units, unixdiag
from agent.census import Census
from agent.cli import _unix_state
from agent.config import Listen, ServiceConfig, load_all, parse_service
from agent.errors import ConfigError
from agent.trial import accept_trial, connect_address

FILE = Path("/etc/zdd-agent/services/api.yaml")
BASE = {"name": "api", "command": "/opt/api/{version}/bin/api",
        "listen": ["unix:/run/api/api.sock"]}


def parse(**kw: object):
    return parse_service(FILE, {**BASE, **kw}, "api")


# ------------------------------------------------------------------ config


def test_unix_listener_parses_with_defaults() -> None:
    svc = parse()
    assert svc.listen == (Listen(None, 0, "/run/api/api.sock"),)
    assert str(svc.listen[0]) == "unix:/run/api/api.sock"
    assert svc.unix_paths == ("/run/api/api.sock",) and svc.ports == ()
    # 0660, root:root: nobody else connects until the config names a group
    assert (svc.socket_user, svc.socket_group, svc.socket_mode) == (None, None, "0660")


def test_socket_file_keys() -> None:
    svc = parse(socket_user="api", socket_group="www-data", socket_mode="660")
    assert (svc.socket_user, svc.socket_group, svc.socket_mode) == ("api", "www-data", "0660")
    assert parse(socket_mode="0600").socket_mode == "0600"


def test_mixed_tcp_and_unix_listeners() -> None:
    """Decided: allowed (socket: inherit). The socket unit holds both, the
    instances inherit both (LISTEN_FDS=2), the census counts both; ports
    (sysctl reserved ports, clashes) are the TCP ones."""
    svc = parse(listen=["unix:/run/api/api.sock", "127.0.0.1:8080"], allow_from=["10.0.0.0/8"])
    assert svc.ports == (8080,) and svc.unix_paths == ("/run/api/api.sock",)
    assert svc.allow_from == ("10.0.0.0/8",)


@pytest.mark.parametrize("kw,key,match", [
    ({"listen": ["unix:run/api.sock"]}, "listen", "must be absolute"),
    ({"listen": ["unix:/run/api/../x.sock"]}, "listen", r"not normalised \(write unix:/run/x"),
    ({"listen": ["unix:/run//api.sock"]}, "listen", "not normalised"),
    ({"listen": ["unix:/run/api/"]}, "listen", "not normalised"),
    ({"listen": ["unix:/run/a b.sock"]}, "listen", "only letters, digits"),
    ({"listen": ["unix:/run/a\nb.sock"]}, "listen", "only letters, digits"),
    ({"listen": ["unix:/run/%i.sock"]}, "listen", "only letters, digits"),
    ({"listen": ["unix:/run/" + "a" * 103]}, "listen", r"108 bytes \(allowed: at most 107"),
    ({"listen": ["unix:@api"]}, "listen", "abstract sockets are refused"),
    ({"listen": ["unix:/tmp/api.sock"]}, "listen", "under /tmp: other users may write"),
    ({"listen": ["unix:/var/tmp/x/api.sock"]}, "listen", "under /var/tmp"),
    ({"listen": ["unix:/dev/shm/api.sock"]}, "listen", "under /dev/shm"),
    ({"listen": ["unix:/run/user/1000/api.sock"]}, "listen", "under /run/user"),
    ({"listen": ["unix:/run/systemd/private"]}, "listen", "the system's own sockets"),
    ({"listen": ["unix:/run/zdd-agent/control.sock"]}, "listen", "under /run/zdd-agent"),
    ({"listen": ["unix:/run/a.sock", "unix:/run/a.sock"]}, "listen", "listed twice"),
    ({"socket": "reuseport"}, "socket", "SO_REUSEPORT is for TCP"),
    ({"socket_mode": 0o660}, "socket_mode", "quote it, '0660'"),
    ({"socket_mode": "rw-rw----"}, "socket_mode", "octal mode"),
    ({"socket_mode": "4660"}, "socket_mode", "without special bits"),
    ({"socket_mode": "0460"}, "socket_mode", "owner without write permission"),
    ({"socket_user": "Nginx"}, "socket_user", "not a user name"),
    ({"socket_group": "www data"}, "socket_group", "not a group name"),
    ({"socket_group": 33}, "socket_group", "not a group name"),
    ({"allow_from": ["10.0.0.0/8"]}, "allow_from", "applies to IP listeners"),
    ({"fast_open": 256}, "fast_open", "TCP Fast Open is for TCP listeners"),
    ({"listen": ["127.0.0.1:8080"], "socket_group": "www-data"}, "socket_group",
     "only for unix: listeners"),
    ({"listen": ["127.0.0.1:8080"], "socket_mode": "0660"}, "socket_mode",
     "only for unix: listeners"),
])
def test_bad_unix_input_names_file_key_and_allowed(kw: dict, key: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        parse(**kw)
    assert str(e.value).startswith(f"{FILE}: {key}: ")
    assert e.value.details["key"] == key and "\n" not in str(e.value)


def test_path_of_107_bytes_fits_sun_path() -> None:
    path = "/run/" + "a" * 102
    assert len(path) == 107 and parse(listen=[f"unix:{path}"]).unix_paths == (path,)


def test_exec_probe_port_check_ignores_unix_listeners() -> None:
    svc = parse(ready={"type": "exec", "command": ["/bin/check", "127.0.0.1:0"]})
    assert svc.ready.command == ("/bin/check", "127.0.0.1:0")


def _write(d: Path, name: str, text: str) -> None:
    p = d / f"{name}.yaml"
    p.write_text(text)
    os.chmod(p, 0o644)


def test_load_all_rejects_a_shared_socket_path(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    _write(tmp_path, "a", "name: a\ncommand: /bin/a\nlisten: ['unix:/run/x.sock']\n")
    _write(tmp_path, "b", "name: b\ncommand: /bin/b\nlisten: ['unix:/run/x.sock', 8080]\n")
    with pytest.raises(ConfigError, match="listen: unix:/run/x.sock is also used by service 'a'"):
        load_all(tmp_path)


# --------------------------------------------------------------- rendering


def test_socket_unit_for_a_unix_listener() -> None:
    svc = parse(socket_user="api", socket_group="www-data", socket_mode="0660")
    files = units.render_service(svc, backlog=4096).files
    sock = files["zdd-api.socket"]
    for line in ("ListenStream=/run/api/api.sock", "SocketUser=api", "SocketGroup=www-data",
                 "SocketMode=0660", "DirectoryMode=0755", "RemoveOnStop=no", "Backlog=4096"):
        assert f"\n{line}\n" in sock, line
    # the kernel refuses SO_REUSEPORT on AF_UNIX (EOPNOTSUPP): not asked for
    assert "ReusePort" not in sock
    assert "Sockets=zdd-api.socket" in files["zdd-api@.service"]


def test_socket_unit_for_mixed_listeners() -> None:
    svc = parse(listen=["127.0.0.1:8080", "unix:/run/api/api.sock"])
    sock = units.render_service(svc, backlog=128).files["zdd-api.socket"]
    assert "ListenStream=127.0.0.1:8080\nListenStream=/run/api/api.sock\nReusePort=yes\n" in sock
    assert "\nSocketUser=root\nSocketGroup=root\nSocketMode=0660\n" in sock


def test_socket_unit_for_tcp_is_unchanged() -> None:
    svc = parse(listen=["127.0.0.1:8080"])
    sock = units.render_service(svc, backlog=128).files["zdd-api.socket"]
    assert "ListenStream=127.0.0.1:8080\nReusePort=yes\nBacklog=128\n" in sock
    assert "Socket" not in sock.split("[Socket]")[1].replace("Sockets", "")


# ------------------------------------------------- unix_diag on real sockets


@pytest.fixture
def listener(tmp_path: Path):
    path = str(tmp_path / "api.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    yield path, s
    s.close()


def ino(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


def test_unix_diag_sees_accepted_pending_and_listening(listener) -> None:
    path, lst = listener
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    for c in clients:
        c.connect(path)
    accepted = [lst.accept()[0] for _ in range(2)]  # the third waits in the queue
    # a connection to another listener and an unnamed pair are not ours
    other_path = path + "2"
    other = socket.socket(socket.AF_UNIX)
    other.bind(other_path)
    other.listen(1)
    oc = socket.socket(socket.AF_UNIX)
    oc.connect(other_path)
    oa = other.accept()[0]
    pair = socket.socketpair()
    try:
        assert unixdiag.established([path]) == {ino(a) for a in accepted}
        assert unixdiag.established([path, other_path]) == {ino(a) for a in (*accepted, oa)}
        [ls] = unixdiag.listening([path])
        assert (ls.inode, ls.name, ls.state) == (ino(lst), path, unixdiag.LISTEN)
        assert (ls.queued, ls.backlog) == (1, 16)  # one not accepted yet; listen(16)
        st = os.stat(path)
        assert ls.vfs is not None and ls.vfs[0] == st.st_ino
        assert os.makedev(ls.vfs[1] >> 20, ls.vfs[1] & 0xFFFFF) == st.st_dev
        # the server side's peer is the client's socket, and the other way round
        assert unixdiag.peers([path]) == {ino(a): ino(c) for a, c in zip(accepted, clients)}
        assert unixdiag.peers([path], {ino(accepted[0])}) == {ino(accepted[0]): ino(clients[0])}
        names = {s.inode: s.name for s in unixdiag.sockets(1 << unixdiag.ESTABLISHED)}
        assert names[ino(clients[0])] is None and names[ino(accepted[0])] == path
    finally:
        for s in (*clients, *accepted, other, oc, oa, *pair):
            s.close()
    assert unixdiag.established([path]) == set()


def test_unix_diag_abstract_names(tmp_path: Path) -> None:
    name = f"zdd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("\0" + name)
        s.listen(1)
        found = [x for x in unixdiag.sockets(1 << unixdiag.LISTEN) if x.inode == ino(s)]
        assert [x.name for x in found] == ["@" + name]


def test_unix_diag_parser_agrees_with_pyroute2(listener) -> None:
    """pyroute2's generic unix_diag parser (too slow for a drain poll) as
    a second reading of the same dump."""
    diag = pytest.importorskip("pyroute2.netlink.diag")
    path, lst = listener
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    a = lst.accept()[0]
    try:
        with diag.DiagSocket() as ds:
            ds.bind()
            msgs = ds.get_sock_stats(family=socket.AF_UNIX, states=1 << unixdiag.ESTABLISHED,
                                     show=unixdiag.UDIAG_SHOW_NAME | unixdiag.UDIAG_SHOW_PEER)
        theirs = {m["udiag_ino"]: m.get_attr("UNIX_DIAG_PEER") for m in msgs
                  if m.get_attr("UNIX_DIAG_NAME") == path}
        assert theirs == unixdiag.peers([path]) == {ino(a): ino(c)}
    finally:
        c.close()
        a.close()


def test_census_counts_unix_connections_per_process(listener) -> None:
    path, lst = listener
    # a child process holds two accepted connections; this one holds one
    child = subprocess.Popen(
        [sys.executable, "-c", "import socket,sys,time\n"
         "s=socket.socket(fileno=int(sys.argv[1]))\nheld=[s.accept()[0] for _ in range(2)]\n"
         "print('up',flush=True)\ntime.sleep(60)", str(lst.fileno())],
        pass_fds=(lst.fileno(),), stdout=subprocess.PIPE, text=True)
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for c in clients[:2]:
            c.connect(path)
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        clients[2].connect(path)
        mine = lst.accept()[0]
        census = Census.for_listen([], unix_paths=[path])
        assert census.families == () and census.ports == frozenset()
        assert census.count_many({"child": [child.pid], "me": [os.getpid()]}) == {
            "child": 2, "me": 1}
        assert census.unix_inodes == unixdiag.established([path])
        held = census.peers({ino(mine)})
        assert held == {ino(mine): f"unix:{path}<-socket:[{ino(clients[2])}]"}
        mine.close()
        assert census.count([os.getpid()]) == 0
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
        for c in clients:
            c.close()


def test_gate_evidence_and_accept_queue_for_a_unix_listener(listener) -> None:
    path, lst = listener
    assert listeners.missing_unix([path], [os.getpid()]) == []
    assert listeners.missing_unix([path, "/run/none.sock"], [os.getpid()]) == [
        "unix:/run/none.sock"]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert listeners.missing_unix([path], [child.pid]) == [f"unix:{path}"]
        # this process is neither known nor PID 1: a stray holder of the path
        strays = listeners.strays_unix([path], {child.pid})
        assert [(s["address"], s["pid"]) for s in strays] == [(f"unix:{path}", os.getpid())]
        assert listeners.strays_unix([path], {os.getpid()}) == []
    finally:
        child.kill()
        child.wait()


def test_accept_trial_over_a_unix_listener(listener) -> None:
    """The agent's own AF_UNIX connections, attributed to the process that
    accepted each through unix_diag's peer inode."""
    path, lst = listener
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(lst.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=serve)
    t.start()
    try:
        census = Census.for_listen([], unix_paths=[path])
        target = Listen(None, 0, path)
        assert connect_address(target) == (socket.AF_UNIX, path)
        res = accept_trial(census, lambda: {"me": [os.getpid()]}, target, 5)
        assert res.as_dict() == {"target": f"unix:{path}", "opened": 5, "accepted": {"me": 5},
                                 "unaccepted": 0}
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()


def test_accept_trial_counts_unaccepted_unix_connections(listener) -> None:
    path, _lst = listener  # nobody accepts
    census = Census.for_listen([], unix_paths=[path])
    res = accept_trial(census, lambda: {"me": [os.getpid()]}, Listen(None, 0, path), 2,
                       sleep=lambda s: None)
    assert (res.opened, res.accepted, res.unaccepted) == (2, {}, 2)


# ----------------------------------------------- preflight, status, doctor


def test_unix_path_problem(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    assert "is not a socket: systemd would unlink it" in deploy.unix_path_problem(str(regular))
    # missing directories are systemd's to create; those that exist must be root's alone
    assert deploy.unix_path_problem("/nonexistent-zdd/x/api.sock") is None
    why = deploy.unix_path_problem(str(tmp_path / "x" / "api.sock"))
    assert why is not None and "must be root's alone" in why


def test_preflight_refuses_unknown_socket_group(tmp_path: Path) -> None:
    exe = tmp_path / "v1" / "bin" / "api"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    svc = parse_service(FILE, {**BASE, "command": f"{tmp_path}/{{version}}/bin/api",
                               "listen": ["unix:/nonexistent-zdd/api.sock"],
                               "socket_group": "no-such-group-zdd"}, "api")
    with pytest.raises(ConfigError, match="socket_group: no such group 'no-such-group-zdd'"):
        deploy.preflight(svc, "v1")


def test_unix_listeners_facts(listener) -> None:
    path, lst = listener
    # built, not parsed: config refuses paths under /tmp, where pytest's are
    svc = ServiceConfig(name="api", command=("/x",), listen=(
        Listen(None, 0, path), Listen(None, 0, "/nonexistent-zdd/api.sock")))
    here, gone = deploy.unix_listeners(svc)
    assert here["listening"] and here["file"]["socket"] and here["file"]["bound"]
    assert here["file"]["mode"] == f"{os.stat(path).st_mode & 0o7777:04o}"
    assert gone == {"path": "/nonexistent-zdd/api.sock", "listening": False, "queued": 0,
                    "backlog": 0, "file": None}
    # the file replaced by another socket's: the listener is unreachable by its path
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        here = deploy.unix_listeners(svc)[0]
        assert here["listening"] and not here["file"]["bound"]


def _entry(**file: object) -> dict:
    f = {"owner": "root", "group": "www-data", "mode": "0660", "socket": True, "bound": True}
    f.update(file)
    return {"path": "/run/api/api.sock", "listening": True, "queued": 2, "backlog": 4096,
            "file": f}


def test_doctor_unix_findings() -> None:
    svc = parse(socket_group="www-data")
    assert [(f.level, f.cause) for f in doctor.unix_findings(svc, [_entry()])] == [
        ("ok", "unix:/run/api/api.sock root:www-data 0660, zdd-api.socket's listener, 2 "
               "waiting to be accepted")]
    [f] = doctor.unix_findings(svc, [_entry(bound=False)])
    assert f.level == "fail" and "another file is there now" in f.cause
    [f] = doctor.unix_findings(svc, [{**_entry(), "file": None}])
    assert f.level == "fail" and "the file is gone" in f.cause and "ENOENT" in f.symptom
    [f] = doctor.unix_findings(svc, [_entry(mode="0666")])
    assert f.level == "warn" and "config asks root:www-data 0660" in f.cause
    [f] = doctor.unix_findings(svc, [{**_entry(), "listening": False}])
    assert f.level == "warn" and "refused" in f.symptom


def test_status_line_for_a_unix_listener() -> None:
    assert _unix_state(_entry()) == "root:www-data 0660, listening, 2 waiting to be accepted"
    assert "replaced since it was bound" in _unix_state(_entry(bound=False))
    assert _unix_state({**_entry(), "file": None, "listening": False}) == (
        "no file (clients get ENOENT), nothing listens")


def test_verify_needs_a_tcp_listener(tmp_path: Path) -> None:
    from agent.verify import Options, check, first_address

    config = tmp_path / "api.yaml"
    config.write_text("name: api\ncommand: /opt/api/{version}/bin/api\n"
                      "listen: ['unix:/run/api/api.sock']\n")
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    with pytest.raises(ConfigError, match="listen: verify drives its load at a TCP address"):
        check(Options(config, "v1", "v2"))
    assert first_address(parse(listen=["unix:/run/api/api.sock", "8080"])) == "127.0.0.1:8080"


def test_apply_socket_access_to_the_listeners_own_file(listener) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    path, _lst = listener
    os.chmod(path, 0o600)
    svc = ServiceConfig(name="api", command=("/x",), listen=(Listen(None, 0, path),),
                        socket_group="www-data" if _has_group("www-data") else "root",
                        socket_mode="0660")
    [note] = deploy.apply_socket_access(svc)
    assert note.startswith(f"{path}: root:") and note.endswith("(the running socket unit keeps "
                                                               "its file)")
    st = os.stat(path)
    assert st.st_mode & 0o7777 == 0o660 and st.st_uid == 0
    assert deploy.apply_socket_access(svc) == []  # as wanted now: nothing to do
    # a file that is not the listener's own is left alone
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        os.chmod(path, 0o600)
        assert deploy.apply_socket_access(svc) == []
        assert os.stat(path).st_mode & 0o7777 == 0o600


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_a_unix_listener_names_its_waiting_connections_oldest_first(listener) -> None:
    """UNIX_DIAG_ICONS: the inodes of the client sockets whose connections
    wait in the listener's queue, oldest first; accept() takes the first
    (what bake.AcceptQueue follows, beside UNIX_DIAG_RQLEN's count)."""
    path, lst = listener
    clients = []
    try:
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            clients.append(c)
        (found,) = unixdiag.listening([path], waiting=True)
        assert found.queued == 3 and found.waiting == tuple(ino(c) for c in clients)
        assert unixdiag.listening([path])[0].waiting == ()  # not asked for
        lst.accept()[0].close()
        assert unixdiag.listening([path], waiting=True)[0].waiting == tuple(
            ino(c) for c in clients[1:])
    finally:
        for c in clients:
            c.close()
