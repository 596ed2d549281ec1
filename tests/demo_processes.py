"""Starting `camscope demo` in a subprocess for the demo tests, and finding every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries ``marker`` (the demo's children inherit it: Ray, Serve, Gradio)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Demo:
    """One ``camscope demo ARGS`` process whose output goes to ``log`` and whose environment is marked."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.marker = f"CAMSCOPE_DEMO_TEST_{uuid.uuid4().hex}"
        self.log = log
        environment = {**os.environ, **(env or {}), self.marker: "1", "RAY_AUTH_MODE": "disabled"}
        self.process = subprocess.Popen([sys.executable, "-m", "camscope.cli", "demo", *args], cwd=ROOT,
                                        env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float) -> str:
        """Wait until the output holds ``line``; the output so far. Raises AssertionError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while line not in self.text():
            if self.process.poll() is not None:
                raise AssertionError(f"camscope demo exited ({self.process.returncode}) before {line!r}:\n"
                                     f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} within {timeout:.0f}s:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        return self.text()

    def stop_within(self, signum: int, seconds: float) -> tuple[int | None, list[int], float]:
        """Send ``signum``; (exit code or None, processes still alive, seconds taken) once the demo and
        everything it started are gone, or ``seconds`` have passed."""
        started = time.monotonic()
        self.process.send_signal(signum)
        deadline = started + seconds
        while time.monotonic() < deadline and (self.process.poll() is None or processes_with(self.marker)):
            time.sleep(0.1)
        return self.process.poll(), processes_with(self.marker), time.monotonic() - started

    def assert_stops_in(self, stage: str, line: str, next_line: str | None, signum: int, seconds: float,
                        settle: float = 0.0, reach_s: float = 600) -> None:
        """Once the demo prints ``line`` (and ``settle`` seconds later, still before ``next_line``), send
        ``signum``: the demo must exit 0 and leave no process behind within ``seconds``."""
        self.wait_for(line, reach_s)
        time.sleep(settle)
        before = self.text()
        assert next_line is None or next_line not in before, f"already past {stage}:\n{before[-2000:]}"
        code, alive, took = self.stop_within(signum, seconds)
        assert code == 0 and not alive, (
            f"{signal.Signals(signum).name} during {stage}: exit code {code}, {len(alive)} process(es) alive "
            f"after {took:.1f}s:\n{self.text()[-3000:]}")
        assert "camscope demo: stopping" in self.text()

    def kill(self) -> None:
        """Clean up after a failed test: kill the demo and everything it started."""
        alive = [self.process.pid] if self.process.poll() is None else []  # never a reaped (reusable) pid
        for pid in alive + processes_with(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
