"""How long a step takes and how much memory it needs: the one harness of :mod:`mlcore.bench` and
:mod:`mlcore.complexity`.

:func:`measure` takes several zero-argument steps and, for each, the peak memory of one call and the
median (min, max) of ``repeats`` timed calls. The timed calls run in rounds, one call of every step per
round: on a shared machine a busy spell then slows every step alike instead of whichever happened to be
running (on a 2-core box at load 5, one S = 8 MAML step read 2.4 s timed alone and 1.2–1.5 s timed
interleaved with the others). The device is synchronised around every timed call, so a CUDA step is
timed to its last kernel, not to its last launch.

Peak memory (:class:`PeakMemory`): on CUDA the caching allocator's peak above the allocation at entry,
exact; on the CPU (Linux) the process's peak resident set size above the RSS at entry, which also counts
allocator slack and moves in page-sized steps, so CPU figures mean something only well above a few MB.

Around them: :func:`num_threads` and :func:`exact_matmuls` (settings held for a block, then restored),
and for a report: :func:`describe_device`, :func:`describe_measure` (how the numbers were taken, in
words) and :func:`format_table`.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

__all__ = ["Measurement", "PeakMemory", "describe_device", "describe_measure", "exact_matmuls", "format_table",
           "measure", "num_threads", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose operations return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the code inside ``with``, in MB, in ``.mb`` (``None`` where it cannot be measured).

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU (Linux): the peak
    resident set size (VmHWM, reset through /proc/self/clear_refs after ``malloc_trim``) above the RSS
    at entry — tensors plus allocator slack.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.mb = torch.device(device), None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_kb("VmRSS") * 1024 if _reset_cpu_peak() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.mb = (_proc_status_kb("VmHWM") * 1024 - self._base) / 2**20


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Release the allocator's free memory and reset the peak RSS (Linux ≥ 4.0); False if impossible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; they would hide later peaks
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Measurement(NamedTuple):
    """Milliseconds per call (median, min, max over the timed calls) and the peak MB of one call."""
    median_ms: float
    min_ms: float
    max_ms: float
    peak_mb: float | None


def measure(steps: Sequence[Callable[[], object]], device: torch.device | str, *, repeats: int, warmup: int = 0,
            log: Callable[[str], None] | None = None) -> list[Measurement]:
    """Measure each of ``steps``: ``warmup`` untimed rounds, one call per step under :class:`PeakMemory`,
    then ``repeats`` timed rounds (one call of every step per round, in order). ``log`` hears each round."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        for step in steps:
            step()
    peaks = []
    for step in steps:
        with PeakMemory(device) as memory:
            step()
        peaks.append(memory.mb)
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(repeats):
        for step, row in zip(steps, times, strict=True):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            row.append(1e3 * (time.perf_counter() - start))
        if log is not None:
            log(f"timing round {round_ + 1}/{repeats} done")
    return [Measurement(statistics.median(t), min(t), max(t), mb) for t, mb in zip(times, peaks, strict=True)]


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside, restored after (``None``: unchanged)."""
    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 off inside on CUDA (cuDNN uses it for convolutions by default), restored after; for exactness checks."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def describe_device(device: torch.device) -> str:
    """The GPU and CUDA version, or the CPU model, torch's threads, the logical CPUs and the load average."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"CPU: {model}, {torch.get_num_threads()} torch threads ({os.cpu_count()} logical CPUs{load})"


def describe_measure(device: torch.device, repeats: int, warmup: int, *, before: str = "") -> list[str]:
    """A report's "time:" and "memory:" lines: what :func:`measure` did on ``device`` (``before``: the
    untimed calls, if any, that ran before its rounds)."""
    cuda = device.type == "cuda"
    sync = "; torch.cuda.synchronize around each step" if cuda else ""
    memory = ("torch.cuda.max_memory_allocated above the allocation before it" if cuda else
              "peak resident set size (VmHWM of /proc/self/status, reset via /proc/self/clear_refs after "
              "malloc_trim) above the RSS before it: tensors plus allocator slack")
    return [f"time: median (min-max) of {repeats} timed steps per row, rows interleaved round by round, after "
            f"{before}{warmup} warm-up round(s) and the memory step{sync}",
            f"memory: of one untimed step per row: {memory}"]


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1, group: int | None = None) -> str:
    """A plain-text table between rules: the first ``left`` columns left-aligned, the others right-aligned
    except the last, which is free text; a blank line wherever column ``group`` changes from the row above."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head) - 1)]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(w) if i < left else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(cells[:-1], widths, strict=True))]
        return "  ".join([*padded, cells[-1]]).rstrip()

    rule = "-" * len(line(head))
    lines = [rule, line(head), rule]
    for i, row in enumerate(rows):
        if group is not None and i > 0 and row[group] != rows[i - 1][group]:
            lines.append("")
        lines.append(line(row))
    return "\n".join([*lines, rule])
