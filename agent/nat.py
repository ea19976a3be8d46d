"""socket: nat at the kernel: one nftables table (`inet zdd-agent`) owned by
the agent, two NAT base chains per service, each change one transaction.

A service's public listen addresses are rewritten, for the first packet of
each new connection, to the private ports of the instances that serve
(kube-proxy's way of mapping a Service to its endpoints):

    chain api-prerouting { type nat hook prerouting priority dstnat; ... }
        fib daddr type local tcp flags syn / fin,syn,rst,ack tcp dport 8080
            redirect to :numgen inc mod 2 map { 0 : 41001, 1 : 41002 }
    chain api-output { type nat hook output priority dstnat; ... }   (clients on this host)
        fib daddr type local tcp flags syn / fin,syn,rst,ack tcp dport 8080
            redirect to :41001

Connection tracking (nf_conntrack) keeps every established flow on the
instance it started with: a rule change moves new connections only, which
is what makes the swap safe. Only a connection's opening SYN is rewritten:
one that conntrack first meets mid-stream (it ran before this namespace
tracked connections: a takeover's legacy clients) keeps its server. A
wildcard or loopback address is redirected (to the incoming interface's
address, or to loopback for local clients: the instance binds a wildcard
or that loopback address); another address is DNATed to itself on the new
port. `fib daddr type local`: only traffic for this host, never connections
it forwards or makes to other hosts.

Source: nft(8) ("NAT STATEMENTS", "NUMGEN EXPRESSION", "FIB EXPRESSIONS"),
libnftables-json(5); the transaction is all or nothing (nf_tables batch,
nfnetlink). Through libnftables' JSON API (Debian's python3-nftables); the
`nft -j -f -` command where the binding is missing, never a shell.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SystemdError

FAMILY = "inet"
TABLE = "zdd-agent"
HOOKS = ("prerouting", "output")
COMMENT = "zdd-agent"  # on every rule the agent writes; read back are only those
DSTNAT = -100  # NF_IP_PRI_NAT_DST: the priority nft calls "dstnat"
# Debian's binding lives in the system Python's dist-packages; a virtualenv
# made from another Python cannot import it otherwise (the module is pure
# Python over ctypes: any Python 3 can use it)
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


class NatError(SystemdError):
    """nftables refused a command, or cannot be reached at all (exit 5, as
    any refusal of the OS)."""


@dataclass(frozen=True)
class Route:
    """Where one service's public addresses go: `listen` is (host, port),
    host None for every address; `ports` the serving instances' private
    ports, spread by the kernel (numgen inc: one after the other) when
    there are several. No ports: no rule (nothing serves)."""

    service: str
    listen: tuple[tuple[str | None, int], ...]
    ports: tuple[int, ...]


def chain_name(service: str, hook: str) -> str:
    return f"{service}-{hook}"


def _chain(service: str, hook: str) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, "name": chain_name(service, hook)}


def _target(ports: Sequence[int]) -> Any:
    if len(ports) == 1:
        return ports[0]
    return {"map": {"key": {"numgen": {"mode": "inc", "mod": len(ports), "offset": 0}},
                    "data": {"set": [[i, p] for i, p in enumerate(ports)]}}}


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address packets carry: an IPv4-mapped one ([::ffff:127.0.0.1])
    is reached by IPv4 clients, whose packets say 127.0.0.1."""
    addr = ipaddress.ip_address(host.strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _kind(host: str | None) -> tuple[str | None, str | None]:
    """(the nft protocol of the address match, or None for any; the address
    to DNAT to, or None to redirect). A wildcard is redirected (to the
    address the connection came in on); a specific address, loopback ones
    too, is DNATed to itself (redirect would send 127.0.0.2 to 127.0.0.1)."""
    if host is None:
        return None, None
    addr = _address(host)
    proto = "ip" if addr.version == 4 else "ip6"
    if addr.is_unspecified:
        # 0.0.0.0 is IPv4 alone (a program bound to it serves no IPv6 client);
        # [::] is both (Linux's default: bindv6only=0)
        return ("ip" if addr.version == 4 else None), None
    return proto, str(addr)


def rule(service: str, hook: str, host: str | None, port: int,
         ports: Sequence[int]) -> dict[str, Any]:
    """One rule: new connections to `host`:`port` go to `ports`."""
    proto, dnat_to = _kind(host)
    expr: list[dict[str, Any]] = [
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                   "right": "local"}}]
    if proto is not None and host is not None:
        addr = _address(host)
        if addr.is_unspecified:
            expr.append({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                                   "right": "ipv4"}})
        else:
            expr.append({"match": {"op": "==",
                                   "left": {"payload": {"protocol": proto, "field": "daddr"}},
                                   "right": str(addr)}})
    # a connection's opening SYN only: a running connection that conntrack
    # first sees mid-stream (opened before any NAT chain made it track this
    # namespace: a takeover's legacy clients; nf_conntrack_tcp_loose picks
    # it up as new) is left to the server it has
    expr.append({"match": {"op": "==", "left": {"&": [
        {"payload": {"protocol": "tcp", "field": "flags"}}, ["fin", "syn", "rst", "ack"]]},
        "right": "syn"}})
    expr.append({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                           "right": port}})
    if dnat_to is None:
        expr.append({"redirect": {"port": _target(ports)}})
    else:
        expr.append({"dnat": {"family": proto, "addr": dnat_to, "port": _target(ports)}})
    return {"family": FAMILY, "table": TABLE, "chain": chain_name(service, hook), "expr": expr,
            "comment": COMMENT}


def commands(route: Route) -> list[dict[str, Any]]:
    """The JSON commands (libnftables-json(5)) of one transaction that makes
    the service's chains say exactly `route`: table and chains created if
    missing, their rules replaced."""
    out: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for hook in HOOKS:
        out.append({"add": {"chain": {**_chain(route.service, hook), "type": "nat", "hook": hook,
                                      "prio": DSTNAT, "policy": "accept"}}})
        out.append({"flush": {"chain": _chain(route.service, hook)}})
        if route.ports:
            for host, port in route.listen:
                out.append({"add": {"rule": rule(route.service, hook, host, port,
                                                 route.ports)}})
    return out


def removal(service: str) -> list[dict[str, Any]]:
    """Commands that delete the service's chains (and nothing else)."""
    out: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for hook in HOOKS:
        # "add" first: a delete of a missing chain would fail the transaction
        out.append({"add": {"chain": {**_chain(service, hook), "type": "nat", "hook": hook,
                                      "prio": DSTNAT, "policy": "accept"}}})
        out.append({"delete": {"chain": _chain(service, hook)}})
    return out


class Nft:
    """One handle on nftables: the binding, or the nft command."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._cmd: str | None = None
        try:
            mod = _import_binding()
            self._lib = mod.Nftables()
            self._lib.set_json_output(True)
            self._lib.set_handle_output(False)
        except (ImportError, OSError):
            self._cmd = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
            if self._cmd is None:
                raise NatError("nftables is not installed: neither the python3-nftables "
                               "binding nor the nft command was found (apt-get install "
                               "python3-nftables nftables)") from None

    @property
    def via(self) -> str:
        return "libnftables" if self._lib is not None else f"{self._cmd} -j"

    def run(self, cmds: list[dict[str, Any]], check: bool = False) -> dict[str, Any]:
        """Run one transaction; the JSON output (a list for list commands).
        `check`: nothing is committed (nft --check)."""
        from . import signals

        doc = {"nftables": cmds}
        if self._lib is not None:
            self._lib.set_dry_run(check)
            try:  # a signal would interrupt libnftables' netlink talk, not the batch
                with signals.deferred():
                    rc, out, err = self._lib.json_cmd(doc)
            finally:
                self._lib.set_dry_run(False)
        else:
            assert self._cmd is not None
            argv = [self._cmd, "-j", *(["-c"] if check else []), "-f", "-"]
            p = subprocess.run(argv, input=json.dumps(doc), capture_output=True, text=True,
                               timeout=30, check=False)
            rc, err = p.returncode, p.stderr
            out = json.loads(p.stdout) if p.stdout.strip() else {}
        if rc != 0:
            raise NatError(_first_error(err) or f"nftables failed (status {rc})")
        return out if isinstance(out, dict) else {}

    def apply(self, route: Route) -> None:
        self.run(commands(route))

    def remove(self, service: str) -> None:
        self.run(removal(service))

    def table(self) -> list[dict[str, Any]]:
        """The agent's table as JSON objects ([] when it does not exist)."""
        try:
            out = self.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        except NatError as e:
            if "No such file" in str(e) or "does not exist" in str(e):
                return []
            raise
        return list(out.get("nftables", []))


def _import_binding() -> Any:
    try:
        import nftables  # type: ignore[import-not-found]
    except ImportError:
        if DIST_PACKAGES in sys.path:
            raise
        sys.path.append(DIST_PACKAGES)
        try:
            import nftables  # type: ignore[import-not-found,no-redef]
        finally:
            sys.path.remove(DIST_PACKAGES)
    return nftables


def _first_error(err: str) -> str:
    lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln]
    first = (errors or lines or [""])[0]
    return first.split(": ", 1)[1] if first.startswith("internal:") and ": " in first else first


def routed(objects: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """service -> {"ports": [...], "listen": [port, ...], "chains": [hook...]}
    read back from the table's JSON (`Nft.table()`): what the kernel will do,
    for drift checks and a swap that starts from what is there."""
    out: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if "chain" in obj:
            c = obj["chain"]
            service, _, hook = str(c.get("name", "")).rpartition("-")
            if hook in HOOKS and service and c.get("hook") == hook:
                out.setdefault(service, {"ports": [], "listen": [], "chains": []})
                out[service]["chains"].append(hook)
        elif "rule" in obj:
            r = obj["rule"]
            service, _, hook = str(r.get("chain", "")).rpartition("-")
            if hook not in HOOKS or not service or r.get("comment") != COMMENT:
                continue  # a rule someone else added: not the agent's to count
            entry = out.setdefault(service, {"ports": [], "listen": [], "chains": []})
            for e in r.get("expr", []):
                m = e.get("match")
                if m and m.get("left", {}).get("payload", {}).get("field") == "dport":
                    if m["right"] not in entry["listen"]:
                        entry["listen"].append(m["right"])
                for verb in ("redirect", "dnat"):
                    if verb in e:
                        for p in _ports_of(e[verb].get("port")):
                            if p not in entry["ports"]:
                                entry["ports"].append(p)
    return out


def _ports_of(target: Any) -> list[int]:
    if isinstance(target, int):
        return [target]
    if isinstance(target, dict) and "map" in target:
        data = target["map"].get("data", {})
        items = data.get("set", []) if isinstance(data, dict) else []
        return [int(v[1]) for v in items if isinstance(v, list) and len(v) == 2]
    return []


def forget(ports: Iterable[int], unanswered: bool = False) -> None:
    """Delete conntrack's NAT entries of connections sent to one of the
    instance `ports`, through pyroute2's Conntrack (ctnetlink): one filtered
    flush per family and port, the kernel matching each entry on its reply
    tuple (CTA_FILTER, Linux 5.8+) and its status (5.15+) as it deletes it.

    - `unanswered`: only those whose first SYN got no answer (no
      IPS_SEEN_REPLY: the listener's accept queue was full and the kernel
      dropped it). The client sends it again a second later, and conntrack
      would send it where the rules pointed then, to an instance being
      withdrawn: without the entry it is NATed afresh, to those that serve
      now. Never an answered one: its next packet would be NATed afresh
      too, mid-connection, to a port that knows nothing of it and resets
      it. So the kernel checks the status at the deletion itself; a
      dump-then-delete let a retransmitted SYN be answered in between (a
      client's request reset: 3 read errors in 10 swaps, CI).
    - all, once the instance has stopped: an entry left in CLOSE state (a
      connection it reset as it died) would catch a client that reuses its
      port, and conntrack's reopen rule does not end an entry the server
      reset (nf_conntrack_proto_tcp.c), so every SYN on that tuple would be
      refused by the closed port again, for as long as they keep coming.
    """
    import socket

    from pyroute2 import Conntrack
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink.nfctsocket import (IPCTNL_MSG_CT_DELETE, NFCTAttrTuple,
                                                       nfct_msg)

    status = {"status": 0, "status_mask": IPS_SEEN_REPLY} if unanswered else {}
    for family in (socket.AF_INET, socket.AF_INET6):
        # the socket's family is every request's nfgen_family (pyroute2)
        with Conntrack(nfgen_family=family) as ct:
            for port in set(ports):
                match = NFCTAttrTuple(family=family, proto=socket.IPPROTO_TCP, sport=port)
                match.attrs()  # sets match.flags
                filt = {"attrs": [["CTA_FILTER_REPLY_FLAGS", match.flags]]}
                ct.request(nfct_msg.create_from(tuple_reply=match, cta_filter=filt, **status),
                           IPCTNL_MSG_CT_DELETE, msg_flags=NLM_F_REQUEST | NLM_F_ACK)


IPS_SEEN_REPLY = 1 << 1  # linux/netfilter/nf_conntrack_common.h


def support_problems() -> list[str]:
    """What this kernel and host lack for socket: nat, one line each ([]: all
    there): nftables reachable, and a NAT chain with a redirect, a DNAT and
    a numgen map accepted by the kernel (checked without committing:
    nft --check), and connection tracking (/proc/sys/net/netfilter)."""
    import os

    problems = []
    try:
        nft = Nft()
        probe = Route("zdd-check", ((None, 1), ("192.0.2.1", 2)), (3, 4))
        nft.run(commands(probe), check=True)
    except NatError as e:
        problems.append(f"nftables NAT: {e}")
    if not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        problems.append("connection tracking (nf_conntrack) is not loaded: established "
                        "connections would not stay on their instance")
    return problems
