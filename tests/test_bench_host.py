"""The benchmarks' CPU accounting (benchmarks/host.py): core-seconds of a process tree by kind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _host():
    spec = importlib.util.spec_from_file_location("host", ROOT / "benchmarks" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n# {tag}"


def test_tree_cpu_counts_children_by_kind_and_only_inside_the_context():
    host = _host()
    before = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=0.4, tag="early-burner")])
    before.wait()
    with host.TreeCpu({"burner": "busy-burner"}, interval=0.05) as cpu:
        subprocess.run([sys.executable, "-c", BURN.format(seconds=0.6, tag="busy-burner")], check=True)
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3)"], check=True)
        started = time.process_time()
        while time.process_time() < started + 0.3:
            pass
    seconds = cpu.seconds()
    assert set(seconds) == {"burner", "driver", "other"}
    assert 0.45 <= seconds["burner"] <= 0.8  # the child's 0.6 s, less what its last interval lost
    assert 0.25 <= seconds["driver"] <= 0.6  # this process's own loop (the poller thread adds a little)
    assert seconds["other"] < 0.2  # the sleeper; the earlier burner finished before the context
    assert cpu.wall >= 0.9
