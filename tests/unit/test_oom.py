"""agent/oom.py: the kernel log's OOM records attributed to a unit, and the
oom_score_adj writes of the surge."""

from __future__ import annotations

import subprocess

from agent import oom

# as read from /dev/kmsg in the sandbox (records of a memcg OOM kill)
RECORDS = [
    (100, "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=1000"),
    (101, "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
          "oom_memcg=/zdd.slice/zdd-api.slice,task_memcg=/zdd.slice/zdd-api.slice/"
          "zdd-api@v2.service,task=python3,pid=7532,uid=0"),
    (102, "Memory cgroup out of memory: Killed process 7532 (python3) total-vm:28912kB, "
          "anon-rss:183040kB, file-rss:6768kB, shmem-rss:0kB, UID:0 pgtables:100kB "
          "oom_score_adj:1000"),
    (500, "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
          "global_oom,task_memcg=/system.slice/zdd-api@v3.service,task=api,pid=900,uid=0"),
]


def test_a_kill_is_attributed_to_its_unit_and_start() -> None:
    got = oom.oom_kill("zdd-api@v2.service", 50, RECORDS)
    assert got == ("the OOM killer took python3 (pid 7532, 178 MiB anonymous memory) when "
                   "/zdd.slice/zdd-api.slice reached its memory limit")
    # an earlier start of the same instance, another unit, a unit name's suffix
    assert oom.oom_kill("zdd-api@v2.service", 200, RECORDS) is None
    assert oom.oom_kill("zdd-api@v1.service", 0, RECORDS) is None
    assert oom.oom_kill("i@v2.service", 0, RECORDS) is None
    assert oom.oom_kill("zdd-api@v3.service", 0, RECORDS) == (
        "the OOM killer took api (pid 900) when the host ran out of memory")


def test_the_kernel_log_reads_or_says_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert oom.kmsg_records(str(tmp_path / "none")) == []
    records = oom.kmsg_records()  # this machine's, as root: a list either way
    assert all(isinstance(ts, int) and isinstance(m, str) for ts, m in records)


def test_set_score_raises_and_restores_a_process() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        before = oom.score(proc.pid)
        assert oom.set_score([proc.pid], oom.SURGE_OOM_SCORE_ADJ) == []
        assert oom.score(proc.pid) == 1000
        assert oom.set_score([proc.pid], before or 0) == []
        assert oom.score(proc.pid) == before
    finally:
        proc.kill()
        proc.wait()
    assert oom.set_score([proc.pid], 0) == [proc.pid]  # gone: reported, not raised
    assert oom.score(proc.pid) is None


def test_headroom_measures_the_cgroup_peak_and_the_slice_room() -> None:
    from agent import deploy

    class FakeSd:
        def memory_current(self, unit: str) -> int | None:
            return 100 << 20

        def memory_peak(self, unit: str) -> int | None:
            return {"a": 300 << 20, "b": 50 << 20}[unit]

        def slice_room(self, unit: str) -> int | None:
            return 200 << 20 if unit == "zdd-api.slice" else None

    mem = deploy.instance_memory(FakeSd(), ["a", "b"], "zdd-api.slice")  # type: ignore[arg-type]
    assert mem is not None and mem.per_instance == 300 << 20
    assert mem.available == 200 << 20 and "peak" in mem.source and "zdd-api.slice" in mem.source
    free = deploy.instance_memory(FakeSd(), ["b"], "other.slice")  # type: ignore[arg-type]
    assert free is not None and free.per_instance == 100 << 20 and free.available > 200 << 20
