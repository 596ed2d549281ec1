"""`camscope demo` stops cleanly at every stage: Ctrl-C (SIGINT) or SIGTERM while it trains and while
the batch job runs ends the demo and every process it started within STOP_S seconds. Each stage
announces itself with a progress line, which is how the test knows where the demo is when the signal
goes out. The later stages (Serve starting, serving) are tested in test_demo_e2e.py, on the store its
demo finished.
"""

from __future__ import annotations

import shutil
import signal

import pytest

from camscope.demo_data import scenes, scenes_cache_path
from demo_processes import Demo

pytestmark = pytest.mark.slow

STOP_S = 10

# stage -> (its progress line, the next stage's line, signal, seconds to let the stage get going)
STAGES = {
    "training": ("preparing model run", "starting a local Ray instance", signal.SIGINT, 3.0),
    "batch job": ("explaining the demo project", "starting the Serve endpoint", signal.SIGTERM, 3.0),
}


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    """A cache holding the demo's scenes but no trained weights, so that the demo has to train."""
    scenes()  # draws or loads the scenes into the usual cache
    cache = tmp_path_factory.mktemp("cold-cache")
    shutil.copy(scenes_cache_path(), cache / scenes_cache_path().name)
    return cache


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_signal_at_each_stage_stops_everything(stage, tmp_path, cold_cache):
    line, next_line, signum, settle = STAGES[stage]
    port = 18950 + list(STAGES).index(stage)
    args = ["--limit", "2", "--out", str(tmp_path / "store"), "--no-ui",
            "--api-port", str(port), "--ui-port", str(port - 1000)]
    env = {"CAMSCOPE_CACHE": str(cold_cache)} if stage == "training" else {}
    demo = Demo(args, tmp_path / "demo.log", env)
    try:
        demo.assert_stops_in(stage, line, next_line, signum, STOP_S, settle)
        if stage == "training":
            assert not list(cold_cache.glob("*.safetensors")), "an interrupted training left weights behind"
    finally:
        demo.kill()
