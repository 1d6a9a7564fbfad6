"""Device-event timing shared by the benchmark scripts: warm-up, then the median of `reps` runs. Without a GPU, the
host clock (a check that a script runs, not a measurement)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _device_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _host_ms(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    clock = _device_ms if torch.cuda.is_available() else _host_ms
    return statistics.median(clock(fn) for _ in range(reps))
