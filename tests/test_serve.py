"""The Ray Serve application over real HTTP: every endpoint, maps equal to the in-process engine's,
the store fast path, batching under concurrency, and every kind of bad input answered with a 4xx
and a ``{"detail": str}`` while the service stays healthy.

One Serve instance (local Ray, own port in 18000-18999) serves the whole module: startup is slow.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from camscope.engine import CamEngine
from camscope.project import Project, load_project
from camscope.rows import explain_samples
from camscope.store import META_FILE, block_id, merge_meta, samples_path, write_block, write_json_atomic, write_table_atomic
from serve.errors import INTERNAL_ERROR, BadRequest
from serve.limits import MAX_BODY_BYTES
from serve.payload import decode_binary_reply, decode_map, encode_npy
from ui import browser

pytestmark = pytest.mark.slow

PROJECT = os.environ.get("CAMSCOPE_SERVE_PROJECT", "camscope.demo:project")
TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STORED = 3          # samples of the first run's last slice written to the test store
TIMEOUT = 120


def free_port() -> int:
    """A free TCP port of this suite's range (18100-18999)."""
    return browser.free_port(range(18100, 19000))


@dataclass
class Service:
    base: str
    project: Project
    run: str
    other_run: str
    slice: str
    stored_ids: list[str]
    computed_ids: list[str]
    root: Path

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(self.base + path, params=params, headers=AUTH, timeout=TIMEOUT)

    def analyze(self, body: dict, headers: dict | None = None) -> requests.Response:
        return requests.post(self.base + "/v1/analyze", json=body, headers=headers or AUTH, timeout=TIMEOUT)


def write_store(root, project: Project, run: str, slice: str, ids: list[str]) -> None:
    """A small real store (the batch job's writers) holding ``ids`` of one (run, slice)."""
    heatmaps, samples = explain_samples(project, run, slice, ids)
    write_block(root, run, slice, block_id(run, slice, ids), heatmaps, samples)
    write_table_atomic(samples, samples_path(root, run, slice))
    write_json_atomic(merge_meta(None, {"project": project.name, "label_names": project.label_names}),
                      root / META_FILE)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from serve.app import start, stop

    project = load_project(PROJECT)
    runs, slices = list(project.runs), list(project.slices)
    run, slice = runs[0], slices[-1]
    ids = project.slices[slice].sample_ids
    for name in runs:  # trained (or loaded) here first, so the replicas load the cached weights
        project.model(name)
    root = tmp_path_factory.mktemp("serve-store")
    write_store(root, project, run, slice, ids[:STORED])
    base = start(PROJECT, store=str(root), port=free_port(), token=TOKEN)
    try:
        yield Service(base, project, run, runs[-1], slice, ids[:STORED], ids[STORED:STORED + 8], root)
    finally:
        stop()


@pytest.fixture(scope="module")
def engines(service):
    return {run: CamEngine(service.project.model(run)) for run in service.project.runs}


def assert_maps_match(reply: dict, explanation, engine: CamEngine) -> None:
    """Every map of a reply dequantizes to the engine's map within the quantization step."""
    position = {label: k for k, label in enumerate(explanation.labels)}
    assert reply["maps"], "no maps in the reply"
    for record in reply["maps"]:
        expected = explanation.maps[record["algorithm"]][record["layer"]][0, position[record["label"]]].numpy()
        got = decode_map(record["heatmap"], record["scale"], record["height"], record["width"])
        assert got.shape == expected.shape
        step = max(float(expected.max()), 1e-12) / 255.0
        np.testing.assert_allclose(got, expected, atol=step * 0.5 + 1e-3 * float(expected.max()) + 1e-7)
        info = engine.layer(record["layer"])
        assert record["depths"] == info.depth and record["depth"] == max(info.depth.values())
    np.testing.assert_allclose(reply["probabilities"], explanation.probabilities[0].numpy(), atol=1e-5)
    assert reply["prediction"] == int(explanation.logits[0].argmax())


def test_healthz_needs_no_token(service):
    reply = requests.get(service.base + "/healthz", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_api_refuses_missing_or_wrong_token(service, headers):
    reply = requests.get(service.base + "/v1/runs", headers=headers, timeout=TIMEOUT)
    assert reply.status_code == 401 and "token" in reply.json()["detail"]


def test_openapi_docs_are_served(service):
    spec = requests.get(service.base + "/openapi.json", timeout=TIMEOUT).json()
    assert {"/healthz", "/v1/analyze", "/v1/runs", "/v1/slices", "/v1/samples", "/v1/similar"} <= set(spec["paths"])


def test_runs_list_layers_with_engine_depths(service, engines):
    body = service.get("/v1/runs").json()
    assert body["label_names"] == service.project.label_names
    assert [r["run"] for r in body["runs"]] == list(service.project.runs)
    for described in body["runs"]:
        engine = engines[described["run"]]
        engine.explain(service.project.load_batch(service.slice, service.stored_ids[:1]), labels=[0])
        assert [(layer["name"], layer["depth"]) for layer in described["layers"]] == [
            (info.name, info.depth) for info in engine.layers]


def test_slices_report_sizes_and_what_is_stored(service):
    body = service.get("/v1/slices", run=service.run).json()
    sizes = {s["name"]: s["size"] for s in body["slices"]}
    assert sizes == {name: len(data.sample_ids) for name, data in service.project.slices.items()}
    stored = {s["name"]: s["stored"][service.run] for s in body["slices"]}
    assert stored[service.slice] is True and sum(stored.values()) == 1


def test_samples_from_the_store(service):
    body = service.get("/v1/samples", run=service.run, slice=service.slice).json()
    assert body["source"] == "store" and body["total"] == STORED
    assert [s["sample_id"] for s in body["samples"]] == service.stored_ids
    for sample in body["samples"]:
        assert sample["gt"] == service.project.ground_truth(service.slice, sample["sample_id"])


def test_samples_computed_are_paged_and_sorted(service):
    size = len(service.project.slices[service.slice].sample_ids)
    first = service.get("/v1/samples", run=service.other_run, slice=service.slice, limit=7).json()
    second = service.get("/v1/samples", run=service.other_run, slice=service.slice, offset=7, limit=7).json()
    assert first["source"] == "engine" and first["total"] == size
    ids = [s["sample_id"] for s in first["samples"] + second["samples"]]
    assert ids == service.project.slices[service.slice].sample_ids[:14]
    worst = service.get("/v1/samples", run=service.other_run, slice=service.slice, sort="loss",
                        descending="true", limit=20).json()["samples"]
    losses = [s["loss"] for s in worst]
    assert losses == sorted(losses, reverse=True)
    assert all(np.isfinite([s["x"], s["y"]]).all() and s["correct"] == (s["gt"] == s["prediction"]) for s in worst)


@pytest.mark.parametrize("which", ["stored", "computed"])
def test_similar_returns_k_nearest_other_samples(service, which):
    run = service.run if which == "stored" else service.other_run
    query = service.stored_ids[0]
    body = service.get("/v1/similar", run=run, slice=service.slice, sample_id=query, k=2).json()
    neighbours = [s["sample_id"] for s in body["neighbors"]]
    assert len(neighbours) == 2 and query not in neighbours
    assert body["source"] == ("store" if which == "stored" else "engine")


@pytest.mark.parametrize("labels", ["all", None])
def test_analyze_stored_sample_from_the_store(service, engines, labels):
    sid = service.stored_ids[1]
    body = {"run": service.run, "slice": service.slice, "sample_id": sid}
    reply = service.analyze(body if labels is None else {**body, "labels": labels})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["source"] == "store"
    engine = engines[service.run]
    classes = len(service.project.label_names)
    explanation = engine.explain(service.project.load_batch(service.slice, [sid]), labels=list(range(classes)))
    assert len(body["maps"]) == 3 * len(engine.layers) * classes
    assert_maps_match(body, explanation, engine)
    gt = service.project.ground_truth(service.slice, sid)
    assert body["analysis"]["gt"] == gt
    assert body["analysis"]["loss"] == pytest.approx(-float(explanation.probabilities[0, gt].log()), rel=1e-4)


def test_analyze_computes_what_the_store_lacks(service, engines):
    sid = service.computed_ids[0]
    layers = [info.name for info in engines[service.run].layers][-2:]
    reply = service.analyze({"run": service.run, "slice": service.slice, "sample_id": int(sid), "labels": [2, 5],
                             "algorithms": ["layercam", "gradcam"], "layers": layers})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["source"] == "engine" and body["labels"] == [2, 5]
    assert {(m["algorithm"], m["layer"], m["label"]) for m in body["maps"]} == {
        (a, layer, c) for a in ("layercam", "gradcam") for layer in layers for c in (2, 5)}
    explanation = engines[service.run].explain(service.project.load_batch(service.slice, [sid]), labels=[2, 5])
    assert_maps_match(body, explanation, engines[service.run])


def test_analyze_new_inputs(service, engines):
    sample = service.project.sample(service.slice, service.computed_ids[1])
    rng = np.random.default_rng(0)
    noisy = {name: np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32) for name, a in sample.items()}
    inputs = {name: encode_npy(a) for name, a in noisy.items()}
    reply = service.analyze({"run": service.other_run, "inputs": inputs, "labels": [1], "algorithms": ["gradcam"]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["analysis"] is None and body["sample_id"] is None
    batch = {name: torch.from_numpy(a)[None] for name, a in noisy.items()}
    assert_maps_match(body, engines[service.other_run].explain(batch, labels=[1], algorithms=["gradcam"]),
                      engines[service.other_run])


@pytest.mark.parametrize("which", ["stored", "computed"])
def test_binary_reply_holds_the_json_replys_maps(service, which):
    sid = service.stored_ids[0] if which == "stored" else service.computed_ids[5]
    body = {"run": service.run, "slice": service.slice, "sample_id": sid, "labels": [0, 1]}
    as_json = service.analyze(body)
    as_binary = service.analyze(body, headers={**AUTH, "Accept": "application/octet-stream"})
    assert as_binary.status_code == 200 and as_binary.headers["content-type"] == "application/octet-stream"
    decoded, expected = decode_binary_reply(as_binary.content), as_json.json()
    assert decoded["source"] == expected["source"] == ("store" if which == "stored" else "engine")
    assert len(decoded["maps"]) == len(expected["maps"]) > 0
    for got, want in zip(decoded["maps"], expected["maps"]):
        assert got["heatmap"] == base64.b64decode(want["heatmap"])
        assert {k: v for k, v in got.items() if k != "heatmap"} == {k: v for k, v in want.items() if k != "heatmap"}
    assert len(as_binary.content) < len(as_json.content)


def test_analyze_per_connection_depths(service, engines):
    connection = list(service.project.connections)[-1]
    body = service.analyze({"run": service.run, "slice": service.slice, "sample_id": service.computed_ids[2],
                            "labels": [0], "algorithms": ["gradcam"], "connection": connection}).json()
    expected = {info.name: info.depth[connection] for info in engines[service.run].layers if connection in info.depth}
    assert {m["layer"]: m["depth"] for m in body["maps"]} == expected


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(service, engines):
    ids = service.computed_ids[:8]
    bodies = [{"run": service.run, "slice": service.slice, "sample_id": sid, "labels": [i % 10],
               "algorithms": ["gradcam", "focus_layercam"][: 1 + i % 2]} for i, sid in enumerate(ids)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(service.analyze, bodies))
    engine = engines[service.run]
    for body, reply in zip(bodies, replies):
        assert reply.status_code == 200, reply.text
        explanation = engine.explain(service.project.load_batch(service.slice, [body["sample_id"]]),
                                     labels=body["labels"], algorithms=body["algorithms"])
        assert {m["algorithm"] for m in reply.json()["maps"]} == set(body["algorithms"])
        assert_maps_match(reply.json(), explanation, engine)


# ------------------------------------------------------------------------------------ bad input
def npy_text(array: np.ndarray, allow_pickle: bool = False) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return base64.b64encode(buffer.getvalue()).decode()


def bad_requests(service: Service) -> dict[str, tuple[int, dict]]:
    """name -> (expected status, keyword arguments of requests.request)."""
    sample = service.project.sample(service.slice, service.stored_ids[0])
    good = {name: npy_text(a) for name, a in sample.items()}
    first = next(iter(sample))
    shape = sample[first].shape

    def inputs(**changed):
        return {"json": {"run": service.run, "inputs": {**good, **changed}}}

    stored = {"run": service.run, "slice": service.slice, "sample_id": service.stored_ids[0]}
    nan, inf = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    nan[0, 0, 0], inf[0, 1, 1] = np.nan, np.inf
    return {
        "malformed JSON": (400, {"data": b'{"run": "x",', "headers": {"Content-Type": "application/json"}}),
        "not a JSON object": (422, {"json": [1, 2]}),
        "form body": (422, {"data": {"run": "x"}}),
        "missing fields": (422, {"json": {"run": service.run}}),
        "missing run": (422, {"json": {"slice": service.slice, "sample_id": "1"}}),
        "both sources": (422, {"json": {**stored, "inputs": good}}),
        "unknown field": (422, {"json": {**stored, "colour": "red"}}),
        "unknown run": (404, {"json": {**stored, "run": "no-such-run"}}),
        "unknown slice": (404, {"json": {**stored, "slice": "no-such-slice"}}),
        "unknown sample": (404, {"json": {**stored, "sample_id": "no-such-sample"}}),
        "unknown layer": (422, {"json": {**stored, "layers": ["no.such.layer"]}}),
        "unknown algorithm": (422, {"json": {**stored, "algorithms": ["gradcam++"]}}),
        "unknown connection": (422, {"json": {**stored, "connection": "nowhere"}}),
        "label out of range": (422, {"json": {**stored, "labels": [len(service.project.label_names)]}}),
        "negative label": (422, {"json": {**stored, "labels": [-1]}}),
        "label not an int": (422, {"json": {**stored, "labels": ["3"]}}),
        "labels not a list": (422, {"json": {**stored, "labels": "some"}}),
        "empty labels": (422, {"json": {**stored, "labels": []}}),
        "wrong shape": (422, inputs(**{first: npy_text(np.zeros((shape[0], shape[1] + 1, shape[2]), np.float32))})),
        "wrong dtype": (422, inputs(**{first: npy_text(np.zeros(shape, np.int64))})),
        "not base64": (422, inputs(**{first: "***not base64***"})),
        "not .npy": (422, inputs(**{first: base64.b64encode(b"PK\x03\x04 a zip, not an npy").decode()})),
        "pickled .npy": (422, inputs(**{first: npy_text(np.array([{"a": 1}], dtype=object), allow_pickle=True)})),
        "raw pickle": (422, inputs(**{first: base64.b64encode(pickle.dumps(np.zeros(shape))).decode()})),
        "truncated .npy": (422, inputs(**{first: npy_text(np.zeros(shape, np.float32))[:200]})),
        "NaN": (422, inputs(**{first: npy_text(nan)})),
        "inf": (422, inputs(**{first: npy_text(inf)})),
        "missing connection": (422, {"json": {"run": service.run, "inputs": {first: good[first]}}}),
        "extra connection": (422, inputs(extra=good[first])),
        "oversized body": (413, {"data": b" " * (17 * 2**20), "headers": {"Content-Type": "application/json"}}),
        "oversized chunked body": (413, {"data": (b" " * 2**20 for _ in range(17)),
                                         "headers": {"Content-Type": "application/json"}}),
    }


BAD = ["malformed JSON", "not a JSON object", "form body", "missing fields", "missing run", "both sources",
       "unknown field", "unknown run", "unknown slice", "unknown sample", "unknown layer", "unknown algorithm",
       "unknown connection", "label out of range", "negative label", "label not an int", "labels not a list",
       "empty labels", "wrong shape", "wrong dtype", "not base64", "not .npy", "pickled .npy", "raw pickle",
       "truncated .npy", "NaN", "inf", "missing connection", "extra connection", "oversized body",
       "oversized chunked body"]


@pytest.mark.parametrize("name", BAD)
def test_bad_analyze_request_gets_4xx_with_detail(service, name):
    status, kwargs = bad_requests(service)[name]
    headers = {**AUTH, **kwargs.pop("headers", {})}
    reply = requests.post(service.base + "/v1/analyze", headers=headers, timeout=TIMEOUT, **kwargs)
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 5
    assert requests.get(service.base + "/healthz", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("path, params, status", [
    ("/v1/samples", {"slice": "validation"}, 422),
    ("/v1/samples", {"run": "no-such-run", "slice": "validation"}, 404),
    ("/v1/samples", {"run": "RUN", "slice": "no-such-slice"}, 404),
    ("/v1/samples", {"run": "RUN", "slice": "SLICE", "limit": 0}, 422),
    ("/v1/samples", {"run": "RUN", "slice": "SLICE", "offset": -1}, 422),
    ("/v1/samples", {"run": "RUN", "slice": "SLICE", "sort": "colour"}, 422),
    ("/v1/similar", {"run": "RUN", "slice": "SLICE", "sample_id": "no-such-sample"}, 404),
    ("/v1/similar", {"run": "RUN", "slice": "SLICE", "sample_id": "ID", "k": 0}, 422),
    ("/v1/slices", {"run": "no-such-run"}, 404),
    ("/v1/nothing-here", {}, 404),
])
def test_bad_query_gets_4xx_with_detail(service, path, params, status):
    names = {"RUN": service.run, "SLICE": service.slice, "ID": service.stored_ids[0]}
    reply = service.get(path, **{key: names.get(value, value) for key, value in params.items()})
    assert reply.status_code == status, reply.text
    assert isinstance(reply.json()["detail"], str)


def test_service_still_answers_after_bad_input(service, engines):
    sid = service.stored_ids[2]
    reply = service.analyze({"run": service.other_run, "slice": service.slice, "sample_id": sid, "labels": [3],
                             "algorithms": ["layercam"]})
    assert reply.status_code == 200, reply.text
    explanation = engines[service.other_run].explain(service.project.load_batch(service.slice, [sid]), labels=[3],
                                                     algorithms=["layercam"])
    assert_maps_match(reply.json(), explanation, engines[service.other_run])


# ------------------------------------------------------------------------ reliability (issue 13)
def test_a_value_finite_in_float64_only_is_a_4xx_and_spares_its_batch(service):
    sample = service.project.sample(service.slice, service.computed_ids[3])
    good = {name: npy_text(a) for name, a in sample.items()}
    first = next(iter(sample))
    huge = {**good, first: npy_text(np.full(sample[first].shape, 1e300))}  # float64: finite; float32: inf
    classes = len(service.project.label_names)
    bodies = [{"run": service.run, "inputs": huge if i == 3 else good, "labels": [i % classes],
               "algorithms": ["gradcam"]} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # sent together, so that @serve.batch puts them in one engine call
        replies = list(pool.map(service.analyze, bodies))
    assert [r.status_code for r in replies] == [200, 200, 200, 422, 200, 200, 200, 200], [r.text[:300] for r in replies]
    assert "infinite as float32" in replies[3].json()["detail"]
    assert [r.json()["labels"] for r in replies[:3]] == [[i % classes] for i in range(3)]  # each its own answer


def test_an_engine_refusal_fails_only_its_own_request_of_a_batch(service):
    from serve.worker import ModelWorker

    worker = ModelWorker(PROJECT, service.run)  # the class the ingress holds
    sample = service.project.sample(service.slice, service.computed_ids[4])
    first = next(iter(sample))
    wrong_shape = {**sample, first: np.zeros((sample[first].shape[0] + 1, *sample[first].shape[1:]), np.float32)}
    missing = {name: a for name, a in sample.items() if name != first}
    layers = [info.name for info in worker.engine.layers][-1:]

    def job(inputs: dict) -> dict:
        return {"request": {"run": service.run, "slice": None, "sample_id": None}, "inputs": inputs, "labels": [1],
                "gt": None, "algorithms": ["gradcam"], "layers": layers, "connection": None}

    jobs = [job(inputs) for inputs in (sample, wrong_shape, sample, missing, sample)]

    sizes, compute = [], worker._explainer.compute
    worker._explainer.compute = lambda items: sizes.append(len(items)) or compute(items)

    async def together():  # submitted at once, so the worker's batcher puts them in one batch
        return await asyncio.gather(*(worker.analyze(j) for j in jobs), return_exceptions=True)

    results = asyncio.run(together())
    assert sizes == [5]
    assert [type(r).__name__ for r in results] == ["bytes", "BadRequest", "bytes", "KeyError", "bytes"], results
    assert "cannot take this input" in results[1].detail and isinstance(results[1], BadRequest)


def serve_logs() -> str:
    """Every Serve log of this test's Ray session (replicas and proxy)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(path.read_text(errors="replace") for path in logs.glob("*.log"))


def test_an_internal_error_is_a_500_with_a_request_id_and_no_internals(service):
    from camscope.store import samples_path

    path = Path(samples_path(service.root, service.run, service.slice))
    saved = path.read_bytes()
    try:
        path.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")  # the store broke under the server
        reply = service.get("/v1/samples", run=service.run, slice=service.slice)
    finally:
        path.write_bytes(saved)
    assert reply.status_code == 500, reply.text
    request_id = reply.headers["x-request-id"]
    assert reply.json() == {"detail": INTERNAL_ERROR.format(request_id)}
    assert not any(word in reply.text for word in ("Traceback", "Error", "Exception", "pid", "\x1b", str(path)))
    deadline = time.monotonic() + 30
    while request_id not in serve_logs() and time.monotonic() < deadline:  # the id leads to the traceback
        time.sleep(0.5)
    assert request_id in serve_logs()
    assert service.get("/v1/samples", run=service.run, slice=service.slice).status_code == 200


def post_with_urllib(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={**AUTH, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post_with_requests(url: str, body: bytes) -> tuple[int, str]:
    reply = requests.post(url, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=TIMEOUT)
    return reply.status_code, reply.text


def post_with_curl(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    (tmp_path / "body.json").write_bytes(body)
    out = subprocess.run(["curl", "-sS", "-X", "POST", "-H", f"Authorization: {AUTH['Authorization']}",
                          "-H", "Content-Type: application/json", "--data-binary", f"@{tmp_path / 'body.json'}",
                          "-w", "\n%{http_code}", url], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    text, _, status = out.stdout.rpartition("\n")
    return int(status), text


@pytest.mark.parametrize("client", ["urllib", "requests", "curl"])
def test_a_body_over_the_limit_is_a_readable_413_for_every_client(service, client, tmp_path):
    body = b" " * (MAX_BODY_BYTES + 2**20)  # 17 MB: the client sends it all before it reads the reply
    url = service.base + "/v1/analyze"
    if client == "curl":
        status, text = post_with_curl(url, body, tmp_path)
    else:
        status, text = {"urllib": post_with_urllib, "requests": post_with_requests}[client](url, body)
    assert status == 413, text
    assert "over the limit" in requests.compat.json.loads(text)["detail"]


# ------------------------------------------------------------------------------------ fuzzing
FUZZ_EXAMPLES = 40   # per endpoint and generation mode
FUZZ_S = 120         # the whole fuzz stops generating after this long


def test_fuzz_every_endpoint_from_its_openapi_document_never_gets_a_5xx(service):
    """Schemathesis generates requests from the service's own OpenAPI document, valid ones and ones
    that break it, for every endpoint, with the token, with a wrong one and without one."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(service.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/healthz", "/v1/runs", "/v1/slices", "/v1/samples", "/v1/similar",
                                              "/v1/analyze"}
    tokens = st.sampled_from([AUTH, AUTH, {}, {"Authorization": "Bearer wrong"}])
    stop_at = time.monotonic() + FUZZ_S
    seen: dict[int, int] = {}
    for operation in operations:
        takes_input = len(operation.query) > 0 or len(operation.body) > 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,):
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode), headers=tokens)
            def no_server_error(case, headers):
                if time.monotonic() > stop_at:
                    return
                reply = case.call(headers=headers, timeout=TIMEOUT)
                seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
                assert reply.status_code < 500, f"{case.method} {case.formatted_path}: {reply.status_code} {reply.text[:500]}"
                if reply.status_code >= 400:
                    assert isinstance(reply.json()["detail"], str), reply.text[:500]

            no_server_error()
    print(f"fuzz replies by status: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 100 and 401 in seen and 200 in seen
    assert requests.get(service.base + "/healthz", timeout=TIMEOUT).json() == {"status": "ok"}


def test_serve_on_a_taken_port_is_a_one_line_error():
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "camscope.cli", "serve", "--project", PROJECT, "--port", str(port)],
                             capture_output=True, text=True, timeout=TIMEOUT,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (f"camscope serve: cannot listen on 127.0.0.1:{port}: "
                                                   "Address already in use")
