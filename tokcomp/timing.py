"""Stage timing for the TTFT breakdown, and peak memory.

Stages nest (a strategy hook inside the encoder loop, an inner-LLM hook inside prefill); each
stage reports *exclusive* time, so the parts add up to the total. On CUDA the marks are CUDA
events read after one synchronisation; on CPU ``perf_counter``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class _Record:
    name: str
    start: object
    end: object = None
    children: list[_Record] = field(default_factory=list)


class StageClock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.root = _Record("root", None)
        self._stack = [self.root]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    @contextmanager
    def stage(self, name: str):
        record = _Record(name, self._mark())
        self._stack[-1].children.append(record)
        self._stack.append(record)
        try:
            yield
        finally:
            record.end = self._mark()
            self._stack.pop()

    def exclusive_ms(self) -> dict[str, float]:
        """Milliseconds per stage name, each excluding the time of stages nested inside it."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)

        def walk(record: _Record) -> None:
            inclusive = self._ms(record.start, record.end)
            nested = sum(self._ms(c.start, c.end) for c in record.children)
            totals[record.name] += inclusive - nested
            for child in record.children:
                walk(child)

        for child in self.root.children:
            walk(child)
        return dict(totals)

    def inclusive_ms(self, name: str) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return sum(self._ms(r.start, r.end) for r in self._all() if r.name == name)

    def _all(self):
        todo = list(self.root.children)
        while todo:
            record = todo.pop()
            todo.extend(record.children)
            yield record


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_high_water_mark() -> bool:
    """Linux lets a process reset its own peak-RSS counter (VmHWM) by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_high_water_mark_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the resident-set peak above the start.

    On Linux the CPU peak is the kernel's own high-water mark (reset on entry), so short spikes are
    not missed; elsewhere a background thread samples the resident set.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.cuda = torch.device(device).type == "cuda"
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._peak = _rss_bytes()
        self._kernel_peak = _reset_rss_high_water_mark()
        if not self._kernel_peak:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        if self._kernel_peak:
            self._peak = _rss_high_water_mark_bytes()
        else:
            self._stop.set()
            self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = max(0.0, (self._peak - self._start) / 2**20)
