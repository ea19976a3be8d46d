"""Real concurrent HTTP/1.1 load with wrk, and its failure count.

wrk counts socket errors (connect, read, write, timeout) and responses with a
status above 399; the Lua hook below prints them as one JSON line when wrk
stops (at its duration, or on SIGINT)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA = """
done = function(summary, latency, requests)
  io.write(string.format(
    'ZDD-RESULT {"requests":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    requests: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    duration_us: int
    p50_us: int
    p99_us: int
    max_us: int

    @property
    def failed(self) -> int:
        return self.connect + self.read + self.write + self.status + self.timeout

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["failed"] = self.failed
        return d


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    return path


def wrk_argv(url: str, clients: int, seconds: float, script: Path, keepalive: bool = True,
             threads: int = 2) -> list[str]:
    argv = [wrk_path(), "-t", str(min(threads, clients)), "-c", str(clients),
            "-d", f"{max(1, int(seconds))}s", "--timeout", "10s", "-s", str(script)]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    return argv + [url]


def write_script(directory: Path) -> Path:
    path = directory / "zdd-wrk.lua"
    path.write_text(LUA)
    return path


def parse(output: str) -> LoadResult:
    for line in output.splitlines():
        if line.startswith("ZDD-RESULT "):
            return LoadResult(**json.loads(line[len("ZDD-RESULT "):]))
    raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")


class Load:
    """wrk running in the background; `stop()` ends it early and parses."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def stop(self, timeout: float = 30) -> LoadResult:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=timeout)
        return parse(out)
