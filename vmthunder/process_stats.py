"""This process's own figures (CPU, memory, descriptors) for status
reports, through psutil."""

from __future__ import annotations

import psutil


def process_figures() -> dict:
    """CPU seconds used (user + system), resident memory and open file
    descriptors of this process, now (the agent's metrics have the same
    as process_cpu_seconds_total, process_resident_memory_bytes and
    process_open_fds)."""
    me = psutil.Process()       # per call: right after a fork too
    with me.oneshot():
        cpu = me.cpu_times()
        return {"cpu_s": round(cpu.user + cpu.system, 3),
                "rss_bytes": me.memory_info().rss,
                "open_fds": me.num_fds()}
