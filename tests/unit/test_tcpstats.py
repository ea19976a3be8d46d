"""Kernel TCP counters: parsing the real /proc format."""

from __future__ import annotations

from agent import tcpstats

NETSTAT = """TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPAbortOnData TCPAbortOnClose
TcpExt: 0 7 9 2 3
IpExt: InNoRoutes
IpExt: 0
"""
SNMP = """Tcp: RtoAlgorithm EstabResets CurrEstab OutRsts
Tcp: 1 4 10 6
"""


def test_parse_picks_the_watched_counters() -> None:
    assert tcpstats.parse(NETSTAT) == {"ListenOverflows": 7, "ListenDrops": 9,
                                       "TCPAbortOnData": 2, "TCPAbortOnClose": 3}
    assert tcpstats.parse(SNMP) == {"EstabResets": 4, "OutRsts": 6}


def test_read_this_namespace() -> None:
    counters = tcpstats.read()
    assert set(counters) == {"ListenOverflows", "ListenDrops", "TCPAbortOnClose",
                             "TCPAbortOnData", "EstabResets", "OutRsts"}
    assert all(v >= 0 for v in counters.values())
