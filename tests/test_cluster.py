"""``camscope run`` submitted through the Ray Jobs API (``ray job submit --working-dir .``) to a real
two-node Ray cluster on this machine, a head node (CPU only) and a second node with one logical GPU,
writing to ``s3://`` on a real S3 API (moto, ``tests/s3server.py``). Mid-run, one ``ray::MapWorker``
process on the GPU node is killed; the job must still succeed on its own (no second run) and leave
every key stored exactly once.

Every Ray process of this cluster carries a marker in its environment; cleanup kills exactly those
PIDs (``ray stop`` would kill every Ray instance on the machine, other people's included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from camscope.storage import resolve
from camscope.store import Store
from s3server import s3  # noqa: F401 - pytest fixture

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 16379
DASHBOARD_PORT = 16265
MARKER = "CAMSCOPE_CLUSTER_TEST"
SAMPLES = 48  # projects.SLOW: 48 samples, 0.25 s to load each
SHARD = 4


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
def cluster(tmp_path, s3):
    """A head node (with the Jobs API) and a one-GPU node whose environment reaches the S3 server, as
    an instance profile would; yields (dashboard address, environment, tag)."""
    tag = uuid.uuid4().hex[:12]
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "CAMSCOPE_PROJECTIONS": "pca", "PATH": os.pathsep.join([str(Path(RAY).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    address = f"127.0.0.1:{HEAD_PORT}"
    temp_dir = Path("/tmp") / f"cs-{tag}"  # short: Ray's socket paths must fit in 107 bytes
    head = [RAY, "start", "--head", f"--port={HEAD_PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={HEAD_PORT + 1}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *_node_ports(16400)]
    worker = [RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              "--num-gpus=1", "--disable-usage-stats", *_node_ports(16500)]
    try:
        subprocess.run(head, env={**env, MARKER: f"{tag}-head"}, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env={**env, MARKER: f"{tag}-gpu"}, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{DASHBOARD_PORT}", env, tag
    finally:
        for pid in _marked_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _submit(dashboard: str, env: dict, out: str) -> subprocess.Popen:
    """``ray job submit --working-dir .`` of the job, as a user does on a running cluster; waits for it."""
    runtime_env = {"excludes": [".git", ".venv", "**/__pycache__", "test-artifacts"]}
    argv = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "-m", "camscope.cli", "run", "--project", "projects:SLOW", "--out", out, "--run", "m",
            "--slice", "val", "--batch-size", "4", "--shard-size", str(SHARD), "--workers", "2",
            "--gpus-per-worker", "0.5"]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _blocks(out: str) -> list[str]:
    location = resolve(out)
    infos = location.fs.get_file_info(pafs.FileSelector(location.join("heatmaps", "m", "val"), allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]


def _kill_one_actor_mid_run(tag: str, out: str, job: subprocess.Popen) -> tuple[int, int]:
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
def test_job_submitted_to_a_two_node_cluster_survives_a_killed_actor(cluster, s3, monkeypatch):
    dashboard, env, tag = cluster
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    out = s3.uri(f"cluster-{tag}")
    job = _submit(dashboard, env, out)
    pid, done_at_kill = _kill_one_actor_mid_run(tag, out, job)
    assert done_at_kill < SAMPLES // SHARD, "the kill must happen while shards remain"
    output, _ = job.communicate(timeout=600)
    print(f"killed actor {pid} with {done_at_kill} shards done; job exit {job.returncode}:\n{output[-1500:]}")
    assert job.returncode == 0, f"the job did not complete the store on its own after the kill:\n{output[-3000:]}"
    assert "succeeded" in output and "camscope run: 48 samples" in output, output[-3000:]

    assert len(_blocks(out)) == SAMPLES // SHARD
    location = resolve(out)
    heatmaps = pq.read_table(location.join("heatmaps"), filesystem=location.fs).to_pandas()
    keys = ["run", "slice", "sample_id", "connection", "algorithm", "layer", "label"]
    assert not heatmaps.duplicated(keys).any()
    assert sorted(heatmaps.sample_id.unique(), key=int) == [str(i) for i in range(SAMPLES)]
    assert len(heatmaps) == SAMPLES * len(heatmaps.drop_duplicates(keys[3:]))
    samples = Store(out).samples("m", "val")
    assert sorted(samples.sample_id, key=int) == [str(i) for i in range(SAMPLES)]
    leftovers = location.fs.get_file_info(pafs.FileSelector(location.join("_camscope.locks"), allow_not_found=True))
    assert not leftovers, "the job's lock is released"
