"""``camscope run`` end to end on real Ray: the demo project into a store, resume, failures, bad arguments."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from camscope import CamEngine
from camscope.cli import main
from camscope.demo import project as demo
from camscope.heatmap import upsample
from camscope.metrics import top_fraction_drop
from camscope.store import FAITHFULNESS_SCHEMA, HEATMAP_SCHEMA, SAMPLE_SCHEMA, Store
from workflows.batch_job import run_job

TESTS = Path(__file__).parent
LIMIT = 6
RUNS = ["cnn", "cnn-small"]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file of a store with its content hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-store")
    summary = run_job("camscope.demo:project", str(out), runs=RUNS, slices=["validation"], batch_size=4, limit=LIMIT,
                      projections=["pca"])
    return out, summary


@pytest.mark.slow
def test_demo_store_has_every_map_of_every_sample(demo_store):
    out, summary = demo_store
    store = Store(out)
    assert store.runs() == sorted(RUNS) and store.slices("cnn") == ["validation"]
    assert summary["samples"] == LIMIT * len(RUNS) and not summary["failed"]
    heatmaps = pq.read_table(out / "heatmaps")
    assert heatmaps.schema.remove_metadata().equals(HEATMAP_SCHEMA)
    assert summary["maps"] == heatmaps.num_rows
    for run in RUNS:
        pairs = sum(len(layer["depth"]) for layer in store.layers(run))  # (connection, layer) pairs
        rows = heatmaps.filter(pc.equal(heatmaps.column("run"), run)).to_pandas()
        assert len(rows) == LIMIT * pairs * 3 * len(demo.label_names)
        assert (rows.heatmap.map(len) == rows.height * rows.width).all()
        keys = ["sample_id", "connection", "algorithm", "layer", "label"]
        assert not rows.duplicated(keys).any()
        samples = store.samples(run, "validation")  # the whole slice, though maps cover only LIMIT samples
        assert samples.sample_id.tolist() == demo.slice("validation").sample_ids
        assert np.isfinite(samples[["x", "y", "pca_x", "pca_y", "confidence", "loss"]].to_numpy()).all()
        assert np.array_equal(samples[["x", "y"]].to_numpy(), samples[["pca_x", "pca_y"]].to_numpy())
        assert store.sample_ids(run, "validation") == demo.slice("validation").sample_ids[:LIMIT]
    assert pq.read_table(out / "samples").schema.remove_metadata().equals(SAMPLE_SCHEMA)
    assert store.meta["labels_policy"]["mode"] == "all" and store.meta["label_names"] == demo.label_names


@pytest.mark.slow
def test_demo_store_values_equal_the_in_process_engine(demo_store):
    out, _ = demo_store
    store = Store(out)
    ids = demo.slice("validation").sample_ids[:2]
    engine = CamEngine(demo.model("cnn"))
    explanation = engine.explain(demo.load_batch("validation", ids))
    for b, sid in enumerate(ids):
        rows = store.sample_maps("cnn", "validation", sid)
        for _, row in rows[rows.label.isin([0, 7])].iterrows():
            raw = explanation.maps[row.algorithm][row.layer][b, row.label].numpy()
            assert np.abs(store.heatmap(row) - raw).max() <= row.scale / 510 + 1e-6 * max(raw.max(), 1)
        prediction = store.samples("cnn", "validation").set_index("sample_id").prediction[sid]
        assert prediction == int(explanation.logits[b].argmax())


@pytest.mark.slow
def test_population_rows_from_explained_shards_equal_those_of_the_rest_of_the_slice(demo_store):
    """The first LIMIT samples' population rows come from their shard's full explanation, the next
    ones from the cheap population explain: both equal the in-process engine's."""
    out, _ = demo_store
    ids = demo.slice("validation").sample_ids[LIMIT - 2 : LIMIT + 2]
    explanation = CamEngine(demo.model("cnn")).explain(demo.load_batch("validation", ids), labels=[0])
    stored = Store(out).samples("cnn", "validation").set_index("sample_id").loc[ids]
    assert np.array_equal(stored.prediction.to_numpy(), explanation.logits.argmax(1).numpy())
    assert np.allclose(stored.confidence.to_numpy(), explanation.probabilities.max(1).values.numpy(), atol=1e-6)
    assert np.allclose(np.stack(stored.embedding.to_numpy()), explanation.embedding.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def faithful_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("faithful-store")
    assert main(["run", "--project", "camscope.demo:project", "--out", str(out), "--run", "cnn",
                 "--slice", "validation", "--limit", "2", "--faithfulness"]) == 0
    return out


@pytest.mark.slow
def test_faithfulness_stores_one_score_per_map_of_the_predicted_label(faithful_store):
    out = faithful_store
    store = Store(out)
    assert store.meta["faithfulness"]["metric"] == "top_fraction_drop"
    assert store.meta["faithfulness"]["fraction"] == 0.1
    scores = pq.read_table(out / "faithfulness")
    assert scores.schema.remove_metadata().equals(FAITHFULNESS_SCHEMA)
    assert sorted(p.name for p in (out / "faithfulness" / "cnn" / "validation").iterdir()) == \
        sorted(p.name for p in (out / "heatmaps" / "cnn" / "validation").iterdir())  # same block ids
    scores = scores.to_pandas()
    assert np.isfinite(scores.score).all() and (scores.score.abs() <= 1).all()
    heatmaps = pq.read_table(out / "heatmaps").to_pandas()
    predicted = store.samples("cnn", "validation").set_index("sample_id").prediction
    expected = heatmaps[heatmaps.label == heatmaps.sample_id.map(predicted)]
    keys = ["sample_id", "connection", "algorithm", "layer", "label"]
    stored_keys = sorted(map(tuple, scores[keys].to_numpy().tolist()))
    assert stored_keys == sorted(map(tuple, expected[keys].to_numpy().tolist()))
    assert len(scores) == 2 * 3 * sum(len(layer["depth"]) for layer in store.layers("cnn"))

    # one stored score == a direct top_fraction_drop of that (stored) map, the other view held fixed
    sid = demo.slice("validation").sample_ids[1]
    label = int(predicted[sid])
    frame = store.sample_faithfulness("cnn", "validation", sid)
    assert len(frame) == len(scores) // 2 and set(frame.label) == {label}
    row = store.sample_maps("cnn", "validation", sid, connection="right", algorithm="layercam", label=label).iloc[0]
    stored = frame[(frame.connection == "right") & (frame.algorithm == "layercam") & (frame.layer == row.layer)]
    inputs = demo.load_batch("validation", [sid])
    model = demo.model("cnn")
    heat = upsample(store.heatmap(row), tuple(inputs["right"].shape[-2:]))[None]
    direct = top_fraction_drop(lambda v: model(left=inputs["left"].expand(len(v), -1, -1, -1), right=v),
                               inputs["right"], heat, [label], fraction=0.1)
    assert float(stored.score.iloc[0]) == pytest.approx(float(direct[0]), abs=1e-5)

    # the UI shows it in the layer info line of the predicted label
    from ui import views
    from ui.backend import Backend

    backend = Backend(store=str(out))
    view = backend.view("cnn", "validation", sid)
    controls = views.Controls(label=label, connection="right", depth_mode=views.LAST_LAYER, position=1,
                              algorithm="layercam")
    step = views.choose_step(view, "right", views.LAST_LAYER, 1)
    score = view.faithfulness[("right", "layercam", step.layer, label)]
    assert f"faithfulness **{score:.2f}** (prob. drop, top 10%)" in views.main_picture(backend, view, controls,
                                                                                      views.RAW)[1]


@pytest.mark.slow
def test_without_the_flag_there_is_no_faithfulness_table(demo_store):
    out, _ = demo_store
    store = Store(out)
    assert not (out / "faithfulness").exists() and "faithfulness" not in store.meta
    sid = demo.slice("validation").sample_ids[0]
    assert store.sample_faithfulness("cnn", "validation", sid).empty


@pytest.mark.slow
def test_resume_does_no_work_and_changes_nothing(demo_store, capsys):
    out, _ = demo_store
    before = _snapshot(out)
    code = main(["run", "--project", "camscope.demo:project", "--out", str(out), "--slice", "validation",
                 "--run", RUNS[0], "--run", RUNS[1], "--batch-size", "8", "--limit", str(LIMIT)])
    assert code == 0
    assert "0 samples, 0 maps" in capsys.readouterr().out
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_failing_sample_fails_alone_and_is_reported_by_id(tmp_path, monkeypatch, capsys):
    """projects:ODD: a loader error, a NaN and a wrong shape, next to six good samples in the same shards."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))
    argv = ["run", "--project", "projects:ODD", "--out", str(tmp_path), "--run", "m", "--slice", "val",
            "--batch-size", "8", "--shard-size", "16"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "failed m/val/bad0: OSError: cannot read sample bad0" in out
    assert "failed m/val/nan1: ValueError: connection 'left' holds values that are not finite in float32" in out
    assert "failed m/val/shape1: ProjectError:" in out and "has shape (1, 9, 8), expected (1, 8, 8)" in out
    store = Store(tmp_path)
    assert store.sample_ids("m", "val") == [str(i) for i in range(6)]  # every good sample of the one shard
    assert store.samples("m", "val").sample_id.tolist() == [str(i) for i in range(6)]
    assert main(argv) == 1  # a re-run redoes nothing and still names the failed samples
    assert "0 samples" in (rerun := capsys.readouterr().out) and "m/val/nan1" in rerun and "m/val/bad0" in rerun


@pytest.mark.slow
def test_projections_are_stored_for_the_whole_slice_and_seeded(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    run_job("projects:GRID", str(tmp_path), runs=["m"], slices=["val"], limit=4, projections=["pca", "umap", "tsne"])
    samples = Store(tmp_path).samples("m", "val")
    assert len(samples) == 100 and Store(tmp_path).sample_ids("m", "val") == ["0", "1", "2", "3"]
    coords = samples[["pca_x", "pca_y", "umap_x", "umap_y", "tsne_x", "tsne_y"]].to_numpy()
    assert np.isfinite(coords).all() and coords.dtype == np.float32
    pairs = [coords[:, i : i + 2] for i in (0, 2, 4)]
    assert not np.allclose(pairs[0], pairs[1]) and not np.allclose(pairs[1], pairs[2])  # three projections
    from camscope.projections import project_all

    again = project_all(np.stack(samples.embedding.to_numpy()).astype(np.float32), ["umap", "tsne"])
    assert np.allclose(again["umap"], pairs[1]) and np.allclose(again["tsne"], pairs[2])  # seeded


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_more_workers_than_cores_share_them_and_every_shard_is_written(tmp_path, monkeypatch):
    """Three actors on two CPUs: each reserves a share of the cores (a whole core each could never be
    scheduled for all three, and the job waited forever)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_job("projects:GRID", str(tmp_path), runs=["m"], slices=["val"], limit=12, shard_size=4,
                          workers=3, projections=["pca"])
        default = run_job("projects:GRID", str(tmp_path / "default"), runs=["m"], slices=["val"], limit=12,
                          shard_size=4, projections=["pca"])
    finally:
        ray.shutdown()
    assert summary["workers"] == 3 and summary["samples"] == 12 and not summary["failed"]
    assert default["workers"] == 2 and default["samples"] == 12  # the default: one actor per core
    assert Store(tmp_path).sample_ids("m", "val") == Store(tmp_path / "default").sample_ids("m", "val")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--project", "no_such_module:project"], "cannot import project module 'no_such_module'"),
        (["--project", "camscope.demo:nothing"], "has no attribute 'nothing'"),
        (["--project", "camscope.demo:project", "--run", "resnet"], "unknown run 'resnet'"),
        (["--project", "camscope.demo:project", "--slice", "test"], "unknown slice 'test'"),
        (["--project", "camscope.demo:project", "--out", "/proc/camscope-store"], "is not writable"),
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(tmp_path, capsys, argv, message):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "store")]
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU to give")
def test_gpus_per_worker_without_a_gpu_is_refused(tmp_path, capsys):
    argv = ["run", "--project", "camscope.demo:project", "--out", str(tmp_path), "--gpus-per-worker", "1"]
    assert main(argv) == 2
    assert "asked for GPUs but this machine has none" in capsys.readouterr().err
    assert not (tmp_path / "heatmaps").exists()
