"""The HTTP ingress: a FastAPI app in one Ray Serve deployment that also holds the models. Handlers
validate every request against the project and the run's layers, answer from the store when it holds
the maps, and otherwise hand the request to the run's :class:`~serve.worker.ModelWorker`, which lives
in the same process: no hop beyond Serve's HTTP proxy."""

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from typing import Literal, Optional

import numpy as np
import pandas as pd
import torch
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from camscope.project import ProjectError, load_project
from camscope.similar import similar_ids
from camscope.store import Store, StoreError
from serve.checks import check_algorithms, check_labels, check_layers, sample_records
from serve.errors import BadRequest, NotFound, Unauthorized, install_handlers
from serve.limits import MAX_BODY_BYTES, BodyLimit
from serve.payload import decode_npy
from serve.reply import BINARY, analyze_reply, sample_analyses, store_records, stored_labels, stored_maps
from serve.schemas import AnalyzeReply, AnalyzeRequest
from serve.worker import ModelWorker

#: Stored samples whose maps the ingress keeps decoded (about 1 MB each for the demo's 810 maps).
CACHED_SAMPLES = 32

api = FastAPI(
    title="camscope",
    description="GradCAM, LayerCAM and Focus LayerCAM at every layer, label and input, on demand.",
    version="0.1.0",
)
install_handlers(api)
api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
bearer = HTTPBearer(auto_error=False, description="the token given to `camscope serve --token`")


async def require_token(request: Request,
                        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    """Refuse the request unless it carries the server's bearer token (when one is set)."""
    token = getattr(request.app.state, "token", None)
    if not token:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token (send 'Authorization: Bearer <token>')")


guarded = [Depends(require_token)]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    """The API of one project, holding one :class:`ModelWorker` per served run (``runs``, default all;
    every replica holds them all)."""

    def __init__(self, project_spec: str, store: str | None = None, token: str | None = None,
                 runs: list[str] | None = None) -> None:
        self.project = load_project(project_spec)
        self.project_spec = project_spec
        self.workers = {run: ModelWorker(project_spec, run) for run in runs or self.project.runs}
        self.store = Store(store) if store else None
        api.state.token = token or None
        self._described: dict[str, dict] = {}
        self._summaries: dict[tuple[str, str], pd.DataFrame] = {}
        self._map_cache: OrderedDict[tuple[str, str, str], dict] = OrderedDict()
        self._cache_lock = threading.Lock()

    def reconfigure(self, config: dict) -> None:
        """The deployment's ``user_config``: ``batch_wait_s``, how long a batch of concurrent requests
        waits to fill (default :data:`serve.worker.BATCH_WAIT_S`); applied in place, without a restart."""
        if config.get("batch_wait_s") is not None:
            for worker in self.workers.values():
                worker.set_batch_wait(float(config["batch_wait_s"]))

    # ------------------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: 200 {"status": "ok"} while the service answers."""
        return {"status": "ok"}

    @api.get("/v1/runs", dependencies=guarded)
    async def runs(self) -> dict:
        """The model runs with their layers (name, depth per connection, shape) and the label names."""
        described = [await self._describe(run) for run in self.workers]
        for info in described:
            info["description"] = self.project.runs[info["run"]].description
        return {"project": self.project.name, "project_spec": self.project_spec,
                "label_names": self.project.label_names,
                "connections": {name: list(c.shape) for name, c in self.project.connections.items()},
                "runs": described}

    @api.get("/v1/slices", dependencies=guarded)
    async def slices(self, run: Optional[str] = None) -> dict:
        """The data slices with their sizes, and whether the store holds them (for ``run`` if given)."""
        if run is not None:
            self._worker(run)
        return {"slices": [{"name": name, "size": len(data.sample_ids),
                            "stored": {r: self._stored(r, name) for r in ([run] if run else self.workers)}}
                           for name, data in self.project.slices.items()]}

    @api.get("/v1/samples", dependencies=guarded)
    async def samples(
        self,
        run: str,
        slice: str,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
        sort: Literal["index", "loss", "confidence"] = "index",
        descending: bool = False,
    ) -> JSONResponse:
        """A page of a slice's samples with prediction, confidence, loss and 2-D position (x, y)."""
        frame, source = await self._summary(run, slice)
        if sort != "index":
            frame = frame.sort_values(sort, ascending=not descending, kind="stable")
        elif descending:
            frame = frame.iloc[::-1]
        page = frame.iloc[offset:offset + limit]
        return JSONResponse({"run": run, "slice": slice, "source": source, "total": len(frame),
                             "offset": offset, "limit": limit, "samples": sample_records(page)})

    @api.get("/v1/similar", dependencies=guarded)
    async def similar(self, run: str, slice: str, sample_id: str, k: int = Query(5, ge=1, le=100)) -> JSONResponse:
        """The ``k`` samples nearest to ``sample_id`` in the run's embedding space (nearest first)."""
        frame, source = await self._summary(run, slice)
        if sample_id not in set(frame["sample_id"]):
            raise NotFound(f"unknown sample id {sample_id!r} in slice {slice!r} of run {run!r}")
        ids = similar_ids(frame["sample_id"].tolist(), np.stack(frame["embedding"].to_numpy()), sample_id, k)
        neighbours = frame.set_index("sample_id", drop=False).loc[ids]
        return JSONResponse({"run": run, "slice": slice, "sample_id": sample_id, "source": source,
                             "neighbors": sample_records(neighbours)})

    @api.post("/v1/analyze", dependencies=guarded, responses={200: {
        "model": AnalyzeReply,
        "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        "description": f"JSON; or, for `Accept: {BINARY}`, a 4-byte little-endian length N, N bytes of the "
                       "JSON reply whose maps carry `offset` and `length` instead of `heatmap`, then the maps' "
                       "uint8 bytes back to back",
    }})
    async def analyze(self, body: AnalyzeRequest, accept: Optional[str] = Header(None)) -> Response:
        """Prediction, probabilities and CAM maps of one sample (stored or sent), with error
        analysis when its ground truth is known."""
        started = time.perf_counter()
        binary = accept is not None and BINARY in accept
        worker = self._worker(body.run)
        described = await self._describe(body.run)
        algorithms = check_algorithms(body.algorithms)
        layers = check_layers(body.layers, body.connection, described)
        labels = check_labels(body.labels, described["num_classes"])
        sample_id = None if body.sample_id is None else str(body.sample_id)
        if body.inputs is not None:
            sample, gt = self._decode_inputs(body.inputs, described["dtype"]), None
        else:
            sample, gt = await asyncio.to_thread(self._load_sample, body.slice, sample_id)
        request = {"run": body.run, "slice": body.slice, "sample_id": sample_id}
        prepared = time.perf_counter()
        reply = await self._from_store(worker, request, body.connection, sample, gt, algorithms, layers, labels,
                                       binary)
        if reply is None:
            job = {"request": request, "inputs": sample, "labels": labels, "gt": gt, "algorithms": algorithms,
                   "layers": layers, "connection": body.connection, "binary": binary}
            reply = await worker.analyze(job)
        done = time.perf_counter()
        timing = f"prepare;dur={(prepared - started) * 1e3:.1f}, maps;dur={(done - prepared) * 1e3:.1f}"
        return Response(content=reply, media_type=BINARY if binary else "application/json",
                        headers={"Server-Timing": timing})

    # ------------------------------------------------------------------------------ helpers
    def _worker(self, run: str):
        if run not in self.workers:
            raise NotFound(f"unknown run {run!r}; known: {', '.join(sorted(self.workers))}")
        return self.workers[run]

    async def _describe(self, run: str) -> dict:
        if run not in self._described:
            self._described[run] = self._worker(run).describe()
        return dict(self._described[run])

    def _load_sample(self, slice: str, sample_id: str) -> tuple[dict[str, np.ndarray], int]:
        try:
            self.project.slice(slice)
            return self.project.sample(slice, sample_id), self.project.ground_truth(slice, sample_id)
        except ProjectError as error:
            raise NotFound(str(error)) from None

    def _decode_inputs(self, inputs: dict[str, str], dtype: str) -> dict[str, np.ndarray]:
        connections = self.project.connections
        unknown = sorted(set(inputs) - set(connections))
        missing = sorted(set(connections) - set(inputs))
        if unknown or missing:
            raise BadRequest(f"inputs must name every connection {sorted(connections)} exactly"
                             + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
        model_dtype = getattr(torch, dtype)
        return {name: decode_npy(text, name, connections[name].shape, model_dtype) for name, text in inputs.items()}

    def _stored(self, run: str, slice: str) -> bool:
        try:
            return self.store is not None and slice in self.store.slices(run)
        except StoreError:
            return False

    async def _from_store(self, worker, request: dict, connection: str | None, sample: dict, gt: int | None,
                          algorithms: list[str], layers: list[str], labels: list[int] | None,
                          binary: bool = False) -> bytes | None:
        """The reply from stored maps (logits from a forward pass), or None if not all of them are stored."""
        run, slice, sample_id = request["run"], request["slice"], request["sample_id"]
        if sample_id is None or not self._stored(run, slice):
            return None
        try:
            maps = await asyncio.to_thread(self._stored_maps, run, slice, sample_id)
        except StoreError:
            return None
        chosen = labels if labels is not None else stored_labels(maps)
        records = store_records(maps, algorithms, layers, chosen, connection)
        if records is None:
            return None
        outputs = await worker.predict(sample)
        analysis = sample_analyses(np.asarray([outputs["logits"]]), [gt], self.project.label_names)[0]
        return analyze_reply(request, self.project.label_names, outputs["logits"], outputs["probabilities"],
                             chosen, records, "store", analysis, binary)

    def _stored_maps(self, run: str, slice: str, sample_id: str) -> dict:
        """A stored sample's maps, kept for the last few samples: a viewer asks for one sample many times."""
        key = (run, slice, sample_id)
        with self._cache_lock:
            if key in self._map_cache:
                self._map_cache.move_to_end(key)
                return self._map_cache[key]
        maps = stored_maps(self.store.sample_maps(run, slice, sample_id))
        with self._cache_lock:
            self._map_cache[key] = maps
            while len(self._map_cache) > CACHED_SAMPLES:
                self._map_cache.popitem(last=False)
        return maps

    async def _summary(self, run: str, slice: str) -> tuple[pd.DataFrame, str]:
        """The slice's per-sample table: from the store when it holds it, else computed by the worker."""
        worker = self._worker(run)
        if slice not in self.project.slices:
            raise NotFound(f"unknown slice {slice!r}; known: {', '.join(sorted(self.project.slices))}")
        if self._stored(run, slice):
            frame = await asyncio.to_thread(self.store.samples, run, slice)
            if len(frame):
                return frame, "store"
        key = (run, slice)
        if key not in self._summaries:
            self._summaries[key] = (await worker.summary(slice))["frame"]
        return self._summaries[key], "engine"
