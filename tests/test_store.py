"""The store and the row layout, in process: rows from a small hand-made two-input project are
written as blocks, read back through ``Store`` and compared with the engine's own maps.

The test projects live in ``tests/projects.py`` (Ray workers import them too).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from camscope import CamEngine
from camscope.heatmap import quantize
from camscope.joblock import JobLock, StoreBusyError
from camscope.rows import batch_rows, explain_batch, explain_samples, labels_policy, load_available, quantize_maps
from camscope.store import (
    HEATMAP_SCHEMA,
    SAMPLE_SCHEMA,
    Store,
    StoreError,
    block_failures,
    block_id,
    merge_meta,
    open_location,
    samples_path,
    shard_file,
    shard_grid,
    write_block,
    write_json_atomic,
    write_table_atomic,
)
from camscope.storage import StorageError, resolve, write_bytes


from projects import TINY, tiny_project
from projects import load as tiny_load


def test_rows_have_the_contract_schema_and_one_row_per_connection_layer_label():
    heatmaps, samples = explain_samples(TINY, "m", "val", ["1", "2"])
    assert heatmaps.schema.equals(HEATMAP_SCHEMA) and samples.schema.equals(SAMPLE_SCHEMA)
    engine = CamEngine(TINY.model("m"))
    engine.explain(TINY.load_batch("val", ["1"]))
    pairs = sum(len(info.depth) for info in engine.layers)  # (connection, layer) pairs
    assert heatmaps.num_rows == 2 * pairs * 3 * 3  # samples x (connection, layer) x algorithms x labels
    frame = heatmaps.to_pandas()
    assert (frame.heatmap.map(len) == frame.height * frame.width).all()
    depths = frame.drop_duplicates(["connection", "layer"]).set_index(["connection", "layer"]).depth
    assert depths[("left", "a.0")] == 1 and depths[("right", "b.0")] == 1
    assert depths[("left", "head")] == depths[("right", "head")] == 3
    assert ("right", "a.0") not in depths.index  # a layer without a path from the input has no rows for it
    assert samples.column("sample_id").to_pylist() == ["1", "2"]
    assert np.isnan(samples.column("x").to_numpy()).all()


def test_stored_bytes_equal_quantized_engine_maps():
    ids = ["3", "4", "5"]
    heatmaps, samples = explain_samples(TINY, "n", "val", ids)
    engine = CamEngine(TINY.model("n"))
    explanation = engine.explain(TINY.load_batch("val", ids))
    frame = heatmaps.to_pandas()
    for algorithm in ("gradcam", "layercam", "focus_layercam"):
        for b, sid in enumerate(ids):
            for label in range(3):
                raw = explanation.maps[algorithm]["head"][b, label]
                expected, scale = quantize(raw)
                row = frame[(frame.sample_id == sid) & (frame.algorithm == algorithm) & (frame.layer == "head")
                            & (frame.label == label) & (frame.connection == "left")].iloc[0]
                assert row.heatmap == expected.tobytes() and np.float32(row.scale) == np.float32(scale)
                assert np.allclose(Store.heatmap(row), raw.numpy(), atol=scale / 510 + 1e-7)
    probabilities = explanation.probabilities
    assert samples.column("prediction").to_pylist() == probabilities.argmax(1).tolist()
    assert np.allclose(samples.column("confidence").to_numpy(), probabilities.max(1).values.numpy())


def test_vectorised_quantize_matches_the_scalar_one_bit_for_bit():
    maps = torch.rand(4, 3, 7, 5) * torch.tensor([0.0, 1e-6, 3.0])[None, :, None, None]
    quantized, scale = quantize_maps(maps)
    for b in range(4):
        for k in range(3):
            expected, expected_scale = quantize(maps[b, k])
            assert np.array_equal(quantized[b, k], expected) and scale[b, k] == np.float32(expected_scale)


@pytest.mark.parametrize("overwrite", [False, True])
def test_bulk_quantize_into_a_buffer_matches_the_scalar_one_with_non_finite_values(overwrite):
    maps = torch.rand(3, 4, 6, 5).transpose(-2, -1) * 7  # not contiguous, as a permuted activation's maps are
    maps[0, 1, 2, 3], maps[1, 2, 0, 0], maps[2, 3], maps[2, 0, 1, 1] = float("nan"), float("inf"), 0.0, -float("inf")
    original = maps.clone()
    out = torch.empty(3, 4, 5, 6, dtype=torch.uint8)
    quantized, scale = quantize_maps(maps, out=out, overwrite=overwrite)
    assert np.shares_memory(quantized, out.numpy())
    assert torch.equal(maps.nan_to_num(), original.nan_to_num()) != overwrite  # scratch used only when allowed
    maps = original
    for b in range(3):
        for k in range(4):
            expected, expected_scale = quantize(maps[b, k])
            assert np.array_equal(quantized[b, k], expected) and scale[b, k] == np.float32(expected_scale)


def _rows_map_by_map(engine: CamEngine, explanation, run: str, slice: str, ids: list[str],
                     per_sample: list[list[int]]) -> list[dict]:
    """The store's rows written the plain way: one map at a time through the scalar quantize."""
    rows = []
    for algorithm, by_layer in explanation.maps.items():
        for info in engine.layers:
            for connection, depth in info.depth.items():
                for b, sid in enumerate(ids):
                    for label in per_sample[b]:
                        raw = by_layer[info.name][b, explanation.labels.index(label)]
                        quantized, scale = quantize(raw[None] if raw.dim() == 1 else raw)
                        rows.append({"run": run, "slice": slice, "sample_id": sid, "connection": connection,
                                     "algorithm": algorithm, "layer": info.name, "depth": depth, "label": label,
                                     "height": quantized.shape[0], "width": quantized.shape[1],
                                     "heatmap": quantized.tobytes(), "scale": float(np.float32(scale))})
    return rows


@pytest.mark.parametrize("classes", [3, 30])  # every label of every sample / each sample's top-k + ground truth
def test_one_pass_rows_equal_rows_built_map_by_map(classes):
    project, ids = tiny_project(classes=classes), ["1", "2", "7"]
    engine = CamEngine(project.model("m"))
    batch = explain_batch(project, "m", "val", ids, engine=engine)
    heatmaps, _ = batch_rows(batch)
    assert heatmaps.schema.equals(HEATMAP_SCHEMA)  # dictionary-built keys are stored as the contract's strings
    expected = _rows_map_by_map(engine, batch.explanation, "m", "val", ids, batch.per_sample)
    assert heatmaps.to_pylist() == expected
    assert any(len(labels) < classes for labels in batch.per_sample) == (classes == 30)  # both row selections


def test_many_classes_get_top_k_plus_ground_truth():
    project = tiny_project(classes=30)
    heatmaps, _ = explain_samples(project, "m", "val", ["1", "2"])
    per_sample = heatmaps.to_pandas().groupby("sample_id").label.unique()
    for sid, labels in per_sample.items():
        assert int(sid) % 30 in labels and 5 <= len(labels) <= 6
    assert labels_policy(30)["mode"] == "top_k" and labels_policy(10)["mode"] == "all"


def test_load_available_reports_failed_ids_and_keeps_the_rest():
    batch, loaded, failed = load_available(TINY, "val", ["1", "bad0", "2"])
    assert loaded == ["1", "2"] and list(failed) == ["bad0"] and "cannot read sample bad0" in failed["bad0"]
    assert batch["left"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("delay, pooled", [(0.0, False), (0.02, True)])
def test_load_available_pools_only_loads_that_wait(delay, pooled):
    """A loader that waits (storage) loads the rest of the batch on threads, in order; one that copies
    from memory loads in the calling thread (a pool would cost several times the loads)."""
    threads = set()

    def load(sid):
        threads.add(threading.get_ident())
        return tiny_load(sid, delay)

    project = tiny_project(samples=8, delay=delay)
    project.slices["val"].load = load
    started = time.perf_counter()
    batch, loaded, failed = load_available(project, "val", [str(i) for i in range(8)], threads=8)
    assert loaded == [str(i) for i in range(8)] and not failed
    assert torch.equal(batch["left"][5], torch.from_numpy(tiny_load("5")["left"]))
    assert (len(threads) > 1) == pooled
    if pooled:  # seven loads of 20 ms side by side after the first
        assert time.perf_counter() - started < 8 * delay


@pytest.fixture()
def written(tmp_path):
    """A store with two blocks of run m / slice val and a samples table."""
    blocks = [["1", "2"], ["3"]]
    for ids in blocks:
        heatmaps, samples = explain_samples(TINY, "m", "val", ids)
        write_block(tmp_path, "m", "val", block_id("m", "val", ids), heatmaps, samples, failed=["bad0"])
    rows = [explain_samples(TINY, "m", "val", ids)[1] for ids in blocks]
    write_table_atomic(pa.concat_tables(rows), samples_path(tmp_path, "m", "val"))
    write_json_atomic(merge_meta(None, {"label_names": TINY.label_names, "runs": {"m": {"layers": []}}}),
                      tmp_path / "_camscope.json")
    return tmp_path


def test_store_reads_what_was_written(written):
    store = Store(written)
    assert store.runs() == ["m"] and store.slices("m") == ["val"]
    assert store.samples("m", "val").sample_id.tolist() == ["1", "2", "3"]
    assert sorted(store.sample_ids("m", "val")) == ["1", "2", "3"]
    maps = store.sample_maps("m", "val", "3")
    assert set(maps.columns) == {"connection", "algorithm", "layer", "depth", "label", "height", "width",
                                 "heatmap", "scale"}
    assert len(maps) == explain_samples(TINY, "m", "val", ["3"])[0].num_rows
    one = store.sample_maps("m", "val", "3", algorithm="gradcam", layer="head", label=1, connection="left")
    assert len(one) == 1 and store.heatmap(one.iloc[0]).shape == (4, 4)
    path = shard_file(open_location(written), "heatmaps", "m", "val", block_id("m", "val", ["3"]))
    assert block_failures(path) == ["bad0"]


def test_store_sees_only_complete_files(written):
    partial = written / "heatmaps" / "m" / "val" / ".block-partial.parquet-0123abcd.tmp"
    partial.write_bytes(b"PAR1 half a file")
    assert sorted(Store(written).sample_ids("m", "val")) == ["1", "2", "3"]


@pytest.mark.parametrize("problem", ["missing", "version"])
def test_store_refuses_a_missing_or_foreign_store(tmp_path, problem):
    if problem == "version":
        (tmp_path / "_camscope.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version" if problem == "version" else "no camscope store"):
        Store(tmp_path)


def test_store_names_what_is_unknown(written):
    store = Store(written)
    with pytest.raises(StoreError, match="unknown run 'zz'"):
        store.samples("zz", "val")
    with pytest.raises(StoreError, match="unknown slice 'zz'"):
        store.samples("m", "zz")
    with pytest.raises(StoreError, match="unknown sample id '99'"):
        store.sample_maps("m", "val", "99")


def test_atomic_write_leaves_no_file_when_writing_fails(tmp_path):
    target = tmp_path / "t.parquet"
    with pytest.raises(Exception):
        write_table_atomic("not a table", target)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    heatmaps, _ = explain_samples(TINY, "m", "val", ["1"])
    target = str(target)
    write_table_atomic(heatmaps, target)
    assert pq.read_table(target).num_rows == heatmaps.num_rows


def test_shard_grid_is_fixed_by_position_in_the_slice():
    ids = [str(i) for i in range(10)]
    assert shard_grid(ids, 4) == [("shard-000000", ids[:4]), ("shard-000001", ids[4:8]), ("shard-000002", ids[8:])]
    assert shard_grid(ids[:6], 4)[1] == ("shard-000001", ids[4:6])  # a --limit cuts a shard, never moves one


def test_local_commit_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_bytes(resolve(tmp_path), str(tmp_path / "sub" / "x.bin"), b"data", job="abc")
    assert synced == [str(tmp_path / "sub" / ".x.bin-abc.tmp"), str(tmp_path / "sub")]
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"data" and sorted(os.listdir(tmp_path / "sub")) == ["x.bin"]


def test_a_second_job_on_one_store_is_refused_and_only_abandoned_temporaries_go(tmp_path):
    location = resolve(tmp_path)
    leftover = tmp_path / "heatmaps" / ".shard-000000.parquet-deadjob.tmp"  # a killed job's half-written shard
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"PAR1")
    with JobLock(location) as first:
        assert not leftover.exists(), "a temporary of a job without a live lock is abandoned"
        mine = tmp_path / "heatmaps" / f".shard-000001.parquet-{first.job}.tmp"
        mine.write_bytes(b"PAR1")
        with pytest.raises(StoreBusyError, match="another camscope job is writing") as refused:
            JobLock(location).acquire()
        assert "\n" not in str(refused.value)
        assert mine.exists(), "the running job's temporary is kept"
        assert len(os.listdir(tmp_path / "_camscope.locks")) == 1
    assert not mine.exists() and os.listdir(tmp_path / "_camscope.locks") == []
    with JobLock(location):  # free again
        pass


def test_a_lock_whose_process_is_gone_is_abandoned(tmp_path):
    locks = tmp_path / "_camscope.locks"
    locks.mkdir()
    from camscope.storage import host_name

    (locks / "0badc0de.json").write_text(json.dumps({"job": "0badc0de", "host": host_name(), "pid": 2 ** 22 + 7}))
    with JobLock(resolve(tmp_path)):
        assert "0badc0de.json" not in os.listdir(locks) and len(os.listdir(locks)) == 1


@pytest.mark.parametrize("uri", ["nosuch://bucket/store", "s3:///store"])
def test_a_uri_nobody_handles_is_a_one_line_store_error(uri):
    with pytest.raises(StorageError) as error:
        Store(uri)
    assert "\n" not in str(error.value) and ("no file system handles" in str(error.value) or "names no bucket" in str(error.value))


def test_samples_schema_keeps_the_contract_columns_and_adds_three_projections():
    names = SAMPLE_SCHEMA.names
    assert names[:10] == ["run", "slice", "sample_id", "gt", "prediction", "confidence", "loss", "embedding", "x", "y"]
    assert names[10:] == ["pca_x", "pca_y", "umap_x", "umap_y", "tsne_x", "tsne_y"]
    assert all(SAMPLE_SCHEMA.field(n).type == pa.float32() for n in names[8:])


def test_remove_store_empties_a_store_and_accepts_a_missing_one(written, tmp_path):
    from camscope.store import remove_store, store_path

    remove_store(written)
    assert list(written.iterdir()) == []
    remove_store(tmp_path / "never-written")
    assert store_path("s3://b/p") == "s3://b/p" and store_path("~/x") == Path("~/x").expanduser()
