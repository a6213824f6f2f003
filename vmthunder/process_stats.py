"""This process's own figures (CPU, memory, descriptors) for status
reports, through psutil."""

from __future__ import annotations

import psutil


def process_figures() -> dict:
    """CPU seconds used (user + system), resident memory, open file
    descriptors and threads of this process, now."""
    me = psutil.Process()       # per call: right after a fork too
    with me.oneshot():
        cpu = me.cpu_times()
        return {"cpu_s": round(cpu.user + cpu.system, 3),
                "rss_bytes": me.memory_info().rss,
                "open_fds": me.num_fds(),
                "threads": me.num_threads()}
