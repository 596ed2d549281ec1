"""The store on object storage, against a real S3 API (moto in server mode, ``tests/s3server.py``):
the batch job end to end through ``s3://``, exactly once per key across jobs with other arguments,
resume after a killed job, the reader API, and every kind of bad location as one line + exit 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from camscope.cli import main
from camscope.storage import StorageError, resolve
from camscope.store import Store
from projects import GRID
from s3server import free_port, s3, s3_store  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
KEYS = ["run", "slice", "sample_id", "connection", "algorithm", "layer", "label"]


@pytest.fixture()
def job_env(s3_store, monkeypatch):
    """A store URI, with the test projects importable and cheap projections for the driver."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("CAMSCOPE_PROJECTIONS", "pca")
    return s3_store


def _tables(uri: str, table: str):
    location = resolve(uri)
    return pq.read_table(location.join(table), filesystem=location.fs).to_pandas()


def _objects(uri: str) -> list[str]:
    location = resolve(uri)
    infos = location.fs.get_file_info(pafs.FileSelector(location.root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(location.root) + 1:] for i in infos if i.type == pafs.FileType.File)


def camscope_run(*args: str) -> int:
    """`camscope run ARGS` as a user runs it: its own process and its own Ray instance (this process's
    environment holds the S3 settings; the test projects are importable)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CAMSCOPE_PROJECTIONS": "pca",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "camscope.cli", "run", *args], cwd=ROOT, env=env,
                          timeout=600).returncode


def _run(uri: str, *args: str) -> int:
    return camscope_run("--project", "projects:GRID", "--out", uri, "--run", "m", "--slice", "val", *args)


def _assert_exactly_once(uri: str, maps_for: int) -> None:
    heatmaps = _tables(uri, "heatmaps")
    assert not heatmaps.duplicated(KEYS).any(), "a key is stored twice"
    assert sorted(heatmaps.sample_id.unique(), key=int) == [str(i) for i in range(maps_for)]
    per_sample = heatmaps.groupby("sample_id").size()
    assert per_sample.nunique() == 1, "every sample has the same number of maps"
    samples = Store(uri).samples("m", "val")
    assert sorted(samples.sample_id, key=int) == [str(i) for i in range(100)] and samples.sample_id.is_unique


def test_exactly_once_across_limits_and_batch_sizes(job_env):
    uri = job_env
    assert _run(uri, "--limit", "50", "--batch-size", "16", "--shard-size", "16") == 0
    _assert_exactly_once(uri, 50)
    assert _run(uri, "--limit", "64", "--batch-size", "8") == 0
    _assert_exactly_once(uri, 64)
    assert _run(uri, "--batch-size", "32") == 0
    _assert_exactly_once(uri, 100)
    objects = _objects(uri)
    assert [o for o in objects if o.startswith("heatmaps/")] == [f"heatmaps/m/val/shard-{k:06d}.parquet"
                                                                 for k in range(7)]
    assert not [o for o in objects if o.startswith("_camscope.locks/")], "the lock is gone after the job"
    assert Store(uri).meta["shard_size"] == 16

    store = Store(uri)  # the reader API on object storage
    assert store.runs() == ["m"] and store.slices("m") == ["val"]
    assert store.sample_ids("m", "val") == [str(i) for i in range(100)]
    rows = store.sample_maps("m", "val", "3", algorithm="gradcam", layer="head", label=1, connection="left")
    assert len(rows) == 1 and store.heatmap(rows.iloc[0]).shape == (4, 4)
    assert store.sample_faithfulness("m", "val", "3").empty


def test_a_killed_job_resumes_and_stores_every_key_once(s3, job_env, tmp_path):
    """SIGKILL the whole job (driver and its Ray) once a first shard is committed, then re-run it."""
    uri = job_env
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled", "CAMSCOPE_PROJECTIONS": "pca",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    argv = [sys.executable, "-m", "camscope.cli", "run", "--project", "projects:RESUME", "--out", uri,
            "--run", "m", "--slice", "val", "--shard-size", "4", "--batch-size", "4"]
    job = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    shards: list[str] = []
    while time.monotonic() < deadline and job.poll() is None:
        shards = [o for o in _objects(uri) if o.startswith("heatmaps/")]
        if shards:
            break
        time.sleep(0.2)
    assert shards and job.poll() is None, f"no shard while the job ran: {job.communicate()[0][-2000:]}"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert len(shards) < 6, "the kill must come while shards remain"
    rerun = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    done = re.search(r"6 blocks, (\d+) already complete", rerun.stdout)
    assert done and len(shards) <= int(done.group(1)) < 6, rerun.stdout[-2000:]  # resumed, not redone
    heatmaps = _tables(uri, "heatmaps")
    assert not heatmaps.duplicated(KEYS).any()
    assert sorted(heatmaps.sample_id.unique(), key=int) == [str(i) for i in range(24)]
    assert sorted(Store(uri).samples("m", "val").sample_id, key=int) == [str(i) for i in range(24)]


def _one_line_exit_2(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("problem", ["unreachable endpoint", "missing bucket", "missing credentials",
                                     "wrong credentials", "schema version", "unknown scheme"])
def test_a_bad_location_is_one_line_and_exit_2(s3, s3_store, monkeypatch, capsys, problem):
    uri = s3_store
    expected = {
        "unreachable endpoint": "is unreachable",
        "missing bucket": "the bucket 'no-such-bucket' does not exist",
        "missing credentials": "no AWS credentials found",
        "wrong credentials": "access denied",
        "schema version": "has schema_version 99",
        "unknown scheme": "no file system handles nosuch://",
    }[problem]
    if problem == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    elif problem == "missing bucket":
        uri = "s3://no-such-bucket/store"
    elif problem == "missing credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.aws either
    elif problem == "wrong credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    elif problem == "schema version":
        location = resolve(uri)
        with location.fs.open_output_stream(location.join("_camscope.json")) as stream:
            stream.write(json.dumps({"schema_version": 99}).encode())
    else:
        uri = "nosuch://bucket/store"
    _one_line_exit_2(capsys, ["run", "--project", "camscope.demo:project", "--out", uri, "--limit", "1"], expected)
    with pytest.raises(StorageError) as error:  # what `camscope serve --store` and `camscope ui --store` open
        Store(uri)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def tiny_on_s3(s3):
    """A store of projects:TINY (run m, slice val, 4 samples with maps) on S3, written by the job."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env.items():
            patch.setenv(name, value)
        patch.syspath_prepend(str(TESTS))
        uri = s3.uri("served-store")
        assert camscope_run("--project", "projects:TINY", "--out", uri, "--run", "m", "--slice", "val",
                            "--limit", "4") == 1  # 1: its sample bad0 fails to load (reported, the rest stored)
    return uri


def _service(argv: list[str], env: dict, ready: str, timeout: float = 300) -> subprocess.Popen:
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if ready in line:
            return process
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"{argv[3]} did not start:\n{''.join(lines)[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_serve_answers_from_the_store_on_s3(s3, tiny_on_s3, monkeypatch):
    import requests

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    port = free_port(18600, 18699)
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    service = _service([sys.executable, "-m", "camscope.cli", "serve", "--project", "projects:TINY", "--store",
                        tiny_on_s3, "--port", str(port)], env, "camscope serve: listening")
    try:
        reply = requests.post(f"http://127.0.0.1:{port}/v1/analyze", timeout=120,
                              json={"run": "m", "slice": "val", "sample_id": "2", "labels": [1],
                                    "algorithms": ["gradcam"]})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["source"] == "store" and body["maps"]
        stored = Store(tiny_on_s3).sample_maps("m", "val", "2", algorithm="gradcam", label=1)
        assert {m["layer"] for m in body["maps"]} == set(stored.layer)
    finally:
        _stop(service)


def test_ui_reads_the_store_on_s3(s3, tiny_on_s3, monkeypatch):
    import requests

    from ui.backend import Backend

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    backend = Backend(store=tiny_on_s3)
    assert backend.runs() == ["m"] and backend.stored_ids("m", "val") == ["0", "1", "2", "3"]
    view = backend.view("m", "val", "1")
    assert view is not None and len(backend.population("m", "val")) == 10  # the whole slice but its failing sample

    port = free_port(17600, 17699)
    env = {**os.environ, **s3.env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    ui = _service([sys.executable, "-m", "camscope.cli", "ui", "--store", tiny_on_s3, "--port", str(port)], env,
                  "camscope ui:")
    try:
        page = requests.get(f"http://127.0.0.1:{port}/config", timeout=60)
        assert page.status_code == 200 and tiny_on_s3 in page.text  # the header names the store it reads
    finally:
        _stop(ui)
