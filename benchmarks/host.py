"""What machine a benchmark ran on, for its result file, and where a measured process tree spent its CPU."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from camscope.strategy_cache import cpu_name  # noqa: F401 - the benchmarks' machine line reads it from here

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: How often :class:`TreeCpu` reads /proc by default.
SAMPLE_INTERVAL_S = 0.25


class TreeCpu:
    """Core-seconds spent by this process and every process started under it (e.g. a local Ray's
    processes and workers) while the context is open, grouped by kind: the first label of ``kinds``
    whose text is in a process's command line, else ``"driver"`` for this process and ``"other"``.
    Sampled from /proc every ``interval`` seconds, so a process that exits loses at most its last
    interval; processes that existed before count only what they spend inside. Linux only: elsewhere
    every kind reads 0."""

    def __init__(self, kinds: dict[str, str], interval: float = SAMPLE_INTERVAL_S) -> None:
        self.kinds, self.interval = kinds, interval
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.wall = 0.0

    def __enter__(self) -> "TreeCpu":
        self._start = {pid: seconds for pid, (_, seconds) in self._sample().items()}
        self._began = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self.wall = time.perf_counter() - self._began

    def seconds(self) -> dict[str, float]:
        """Core-seconds per kind (every label of ``kinds``, ``"driver"`` and ``"other"``)."""
        totals = dict.fromkeys([*self.kinds, "driver", "other"], 0.0)
        for pid, (kind, seconds) in self._last.items():
            totals[kind] += seconds - self._start.get(pid, 0.0)
        return totals

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def _record(self) -> None:
        self._last.update(self._sample())

    def _sample(self) -> dict[int, tuple[str, float]]:
        """``pid -> (kind, core-seconds so far)`` of this process and its descendants."""
        stats = {}
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS, entry)
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in stats.items():
            children.setdefault(parent, []).append(pid)
        tree, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return {pid: (self._kind(pid, stats[pid][2]), stats[pid][1]) for pid in tree if pid in stats}

    def _kind(self, pid: int, entry: Path) -> str:
        """The process's kind; a kind once seen sticks (a Ray worker renames itself back when idle)."""
        known = self._last.get(pid, ("other", 0.0))[0]
        if known != "other":
            return known
        if pid == os.getpid():
            return "driver"
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            return next((kind for kind, text in self.kinds.items() if text in command), "other")
        return "other"
