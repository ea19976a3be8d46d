"""The OOM killer and the surge: which instance it takes, and how the agent
knows that it did.

During a surge old and new instances run side by side. The new ones start
with oom_score_adj SURGE_OOM_SCORE_ADJ (the template's OOMScoreAdjust=), so
when memory runs out the kernel's OOM killer takes a new instance, never a
serving one (mm/oom_kill.c oom_badness: points + oom_score_adj * totalpages /
1000; at 1000 a process outranks every process at 0 or less). Once an
instance is admitted for good, the agent writes the configured value (or
the service manager's own) to each of its processes (proc(5)
/proc/PID/oom_score_adj). Lowering it needs CAP_SYS_RESOURCE only below the
process's oom_score_adj_min, which only a privileged writer sets.

Evidence that the OOM killer took an instance: systemd's Result=oom-kill
(cgroup v2: memory.events oom_kill of the unit's cgroup). On the legacy and
hybrid hierarchies systemd sees only SIGKILL, so the kernel's own record is
read: /dev/kmsg (Documentation/ABI/testing/dev-kmsg) holds
"oom-kill:constraint=...,oom_memcg=...,task_memcg=/.../UNIT,task=...,pid=N"
for each kill, with the unit's cgroup, which stays right across PID
namespaces (the pid there is the kernel's initial namespace's).
"""

from __future__ import annotations

import os
import re

SURGE_OOM_SCORE_ADJ = 1000
_KMSG = "/dev/kmsg"
_RECORD = re.compile(r"(\d+),(\d+),(\d+),[^;]*;(.*)")
_KILL = re.compile(r"oom-kill:(?P<fields>.*)")
_KILLED = re.compile(r"(?:Memory cgroup out of memory|Out of memory): Killed process (\d+) "
                     r"\(([^)]*)\).*?anon-rss:(\d+)kB")
MAX_RECORDS = 20000  # the kernel's ring buffer holds a few thousand at most


def kmsg_records(path: str = _KMSG) -> list[tuple[int, str]]:
    """(microseconds since boot, message) of every record in the kernel's
    log buffer; [] when it cannot be read (no CAP_SYSLOG, no /dev/kmsg)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    out: list[tuple[int, str]] = []
    try:
        while len(out) < MAX_RECORDS:
            try:
                raw = os.read(fd, 8192)  # one record per read(2)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while reading; go on
                continue
            if not raw:
                break
            m = _RECORD.match(raw.decode("utf-8", "replace"))
            if m:
                out.append((int(m.group(3)), m.group(4).rstrip("\n")))
    finally:
        os.close(fd)
    return out


def oom_kill(unit: str, since_us: int = 0,
             records: list[tuple[int, str]] | None = None) -> str | None:
    """How the OOM killer took a process of `unit` at or after `since_us`
    (CLOCK_MONOTONIC microseconds, as systemd's *TimestampMonotonic), e.g.
    "the OOM killer took python3 (pid 7532, 18 MiB anonymous memory) when
    /zdd-api.slice reached its memory limit"; None when the kernel's log has
    no such record (or cannot be read)."""
    recs = kmsg_records() if records is None else records
    for i, (ts, msg) in enumerate(recs):
        m = _KILL.match(msg)
        if not m or ts < since_us:
            continue
        fields = dict(f.split("=", 1) for f in m.group("fields").split(",") if "=" in f)
        if not fields.get("task_memcg", "").endswith("/" + unit):
            continue
        where = fields.get("oom_memcg", "")
        why = (f"{where} reached its memory limit" if fields.get("constraint") ==
               "CONSTRAINT_MEMCG" else "the host ran out of memory")
        task, pid = fields.get("task", "?"), fields.get("pid", "?")
        rss = ""
        for _ts, nxt in recs[i + 1:i + 4]:
            k = _KILLED.search(nxt)
            if k and k.group(1) == pid:
                rss = f", {int(k.group(3)) // 1024} MiB anonymous memory"
                break
        return f"the OOM killer took {task} (pid {pid}{rss}) when {why}"
    return None


def set_score(pids: list[int], value: int) -> list[int]:
    """Write `value` to /proc/PID/oom_score_adj of each process; the PIDs
    that could not be set (gone, or EACCES below oom_score_adj_min without
    CAP_SYS_RESOURCE)."""
    failed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write(str(value))
        except OSError:
            failed.append(pid)
    return failed


def score(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
