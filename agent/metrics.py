"""Prometheus metrics of the daemon (opt-in, loopback only): swaps by
result, swap and drain durations, connections per instance, readiness probe
failures, sysctl drift."""

from __future__ import annotations

import ipaddress
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import ConfigError

_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def parse_listen(text: str, where: str, loopback: bool = True) -> tuple[str, int]:
    """'HOST:PORT' or '[V6HOST]:PORT' -> (host, port); ConfigError, one line
    starting with `where`. Text with whitespace or control characters is
    refused first: int() strips whitespace and an IPv6 scope id ('%...') may
    hold anything, a newline included, which then split the error message
    (or reached bind())."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not text.isprintable() or any(c.isspace() for c in text) \
                or not (port.isascii() and port.isdigit()):  # int() takes "٩٤٧٠", "+80"
            raise ValueError(text)
        ip = ipaddress.ip_address(host)
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not host:port (e.g. 127.0.0.1:9469)") from None
    if loopback and not ip.is_loopback:
        raise ConfigError(f"{where}: {host} is not a loopback address (allowed: 127.0.0.0/8, "
                          "::1): metrics are served without authentication")
    if not 1 <= port_n <= 65535:
        raise ConfigError(f"{where}: port {port_n} is out of range (allowed: 1..65535)")
    return host, port_n


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.swaps = Counter("zdd_swaps", "Swaps by service and result", ["service", "result"],
                             registry=r)
        self.swap_seconds = Histogram("zdd_swap_duration_seconds", "Duration of swaps",
                                      ["service"], buckets=_BUCKETS, registry=r)
        self.drain_seconds = Histogram("zdd_drain_duration_seconds", "Duration of drains",
                                       ["service"], buckets=_BUCKETS, registry=r)
        self.killed = Counter("zdd_connections_cut", "Connections cut at the grace period",
                              ["service"], registry=r)
        self.connections = Gauge("zdd_instance_connections",
                                 "Established connections per instance",
                                 ["service", "version"], registry=r)
        self.probe_failures = Counter("zdd_readiness_probe_failures",
                                      "Failed readiness probes", ["service"], registry=r)
        self.auto_reverts = Counter("zdd_auto_reverts", "Swaps reverted by the daemon's "
                                    "watch after the new version failed", ["service"],
                                    registry=r)
        self.watching = Gauge("zdd_watching", "1 while the daemon watches a service's new "
                              "version after a swap", ["service"], registry=r)
        self.sysctl_drift = Gauge("zdd_sysctl_drift",
                                  "1 when a managed sysctl differs from the wanted value",
                                  ["key"], registry=r)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def on_event(self, service: str) -> Any:
        def emit(kind: str, d: dict[str, Any]) -> None:
            if kind == "probe" and not d["ok"]:
                self.probe_failures.labels(service).inc()
        return emit

    def on_result(self, r: dict[str, Any]) -> None:
        service = r["service"]
        self.swaps.labels(service, r["result"]).inc()
        if r["result"] == "auto_reverted":
            self.auto_reverts.labels(service).inc()
        if r["result"] != "unchanged":
            self.swap_seconds.labels(service).observe(r["seconds"])
        drain = r.get("drain")
        if drain:
            self.drain_seconds.labels(service).observe(drain["seconds"])
            if drain["killed_at_grace"]:
                self.killed.labels(service).inc(drain["connections_at_end"])

    def on_status(self, rows: list[dict[str, Any]]) -> None:
        self.connections.clear()
        for row in rows:
            for inst in row["instances"]:
                self.connections.labels(row["service"], inst["version"]).set(inst["connections"])

    def on_sysctl(self, drift: dict[str, bool]) -> None:
        for key, differs in drift.items():
            self.sysctl_drift.labels(key).set(1 if differs else 0)
