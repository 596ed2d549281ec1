"""``camscope run --address`` on a real two-node Ray cluster on this machine: a head node (CPU only)
and a second node with one logical GPU. Mid-run, one worker actor's process is killed; the store is
then complete without duplicates (after at most one re-run).

Every Ray process of this cluster carries a marker in its environment; cleanup kills exactly those
PIDs (``ray stop`` would kill every Ray instance on the machine, other people's included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from camscope.store import Store

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 16379
MARKER = "CAMSCOPE_CLUSTER_TEST"
SAMPLES = 48  # test_store.SLOW: 48 samples, 0.25 s to load each


def _node_ports(base: int) -> list[str]:
    """Distinct ports (inside this suite's 16000-16999 range) for one node's Ray services."""
    return [
        f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
        f"--runtime-env-agent-port={base + 2}", f"--dashboard-agent-grpc-port={base + 3}",
        f"--dashboard-agent-listen-port={base + 4}", f"--metrics-export-port={base + 5}",
        f"--min-worker-port={base + 10}", f"--max-worker-port={base + 60}",
    ]


def _marked_pids(tag: str) -> list[int]:
    """PIDs of processes whose environment holds ``MARKER=tag...`` (processes of this test's cluster)."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture()
def cluster(tmp_path):
    """A head node and a one-GPU node; yields (address, environment, tag)."""
    tag = uuid.uuid4().hex[:12]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    address = f"127.0.0.1:{HEAD_PORT}"
    temp_dir = Path("/tmp") / f"cs-{tag}"  # short: Ray's socket paths must fit in 107 bytes
    head = [RAY, "start", "--head", f"--port={HEAD_PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--num-gpus=0", "--include-dashboard=false", f"--ray-client-server-port={HEAD_PORT + 1}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *_node_ports(16400)]
    worker = [RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              "--num-gpus=1", "--disable-usage-stats", *_node_ports(16500)]
    try:
        subprocess.run(head, env={**env, MARKER: f"{tag}-head"}, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env={**env, MARKER: f"{tag}-gpu"}, check=True, capture_output=True, timeout=180)
        yield address, env, tag
    finally:
        for pid in _marked_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _job(address: str, env: dict, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "camscope.cli", "run", "--project", "test_store:SLOW", "--out", str(out),
            "--run", "m", "--slice", "val", "--batch-size", "4", "--workers", "2", "--gpus-per-worker", "0.5",
            "--address", address]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _blocks(out: Path) -> list[Path]:
    directory = out / "heatmaps" / "m" / "val"
    return [p for p in directory.glob("*.parquet") if not p.name.startswith(".")] if directory.is_dir() else []


def _kill_one_actor_mid_run(tag: str, out: Path, job: subprocess.Popen) -> tuple[int, int]:
    """SIGKILL one MapWorker process on the GPU node once a first block is committed; (pid, blocks then)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        actors = [pid for pid in _marked_pids(f"{tag}-gpu") if _cmdline(pid).startswith("ray::MapWorker")]
        done = len(_blocks(out))
        if actors and done >= 1:
            os.kill(actors[0], signal.SIGKILL)
            return actors[0], done
        time.sleep(0.1)
    pytest.fail(f"no MapWorker actor on the GPU node while the job ran:\n{job.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_job_survives_a_killed_actor_on_a_two_node_cluster(cluster, tmp_path):
    address, env, tag = cluster
    out = tmp_path / "store"
    job = _job(address, env, out)
    pid, done_at_kill = _kill_one_actor_mid_run(tag, out, job)
    assert done_at_kill < SAMPLES // 4, "the kill must happen while blocks remain"
    output, _ = job.communicate(timeout=600)
    print(f"killed actor {pid} with {done_at_kill} blocks done; job exit {job.returncode}:\n{output[-1500:]}")
    if job.returncode != 0:  # at most one re-run completes the store
        rerun = _job(address, env, out)
        output, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, output[-3000:]
    assert "camscope run:" in output

    assert len(_blocks(out)) == SAMPLES // 4
    heatmaps = pq.read_table(out / "heatmaps").to_pandas()
    keys = ["run", "slice", "sample_id", "connection", "algorithm", "layer", "label"]
    assert not heatmaps.duplicated(keys).any()
    assert sorted(heatmaps.sample_id.unique(), key=int) == [str(i) for i in range(SAMPLES)]
    assert len(heatmaps) == SAMPLES * len(heatmaps.drop_duplicates(keys[3:]))
    samples = Store(out).samples("m", "val")
    assert sorted(samples.sample_id, key=int) == [str(i) for i in range(SAMPLES)]
    assert not list(out.rglob(".*.tmp")), "no temporary file is left behind"
