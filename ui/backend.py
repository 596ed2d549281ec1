"""What the UI reads: the Parquet store, the Serve API, or both, plus the project when importable.

Store only: browse precomputed maps. API only: analyze on demand. Both: the store first, the API
for samples the store lacks. Every failure is a :class:`UIError` with a one-line message.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from camscope.project import Project, ProjectError, load_project
from camscope.similar import similar_ids
from ui.api_client import ApiClient, ApiError
from ui.sample_maps import SampleMaps

CACHED_SAMPLES = 64
API_PAGE = 1000  # the API's largest page of /v1/samples
MAX_POPULATION = 20_000  # samples drawn in the population view
SAMPLE_COLUMNS = ["sample_id", "gt", "prediction", "confidence", "loss", "x", "y"]
THUMBNAIL_PX = 96  # long side of a population hover thumbnail


class UIError(ValueError):
    """A problem to show in the page as one line (unknown id, API down, empty slice...)."""


@dataclass
class SampleView:
    """One analyzed sample: its decoded maps and its error-analysis numbers."""

    run: str
    slice: str
    sample_id: str
    maps: SampleMaps
    prediction: int
    gt: int | None
    loss: float | None
    confidence: float | None
    probabilities: np.ndarray | None
    #: Stored faithfulness scores (``camscope run --faithfulness``), (connection, algorithm, layer, label) -> score.
    faithfulness: dict[tuple[str, str, str, int], float] = field(default_factory=dict)


class Backend:
    """The UI's single source of data.

    Args:
        store: a store directory written by ``camscope run`` (or None).
        api: base URL of ``camscope serve`` (or None).
        project: ``"module:attr"`` overriding the project named by the store / API.
    """

    def __init__(self, store: str | None = None, api: str | None = None, project: str | None = None,
                 token: str | None = None) -> None:
        if not store and not api:
            raise UIError("the UI needs a store directory (--store) or an API URL (--api), or both")
        self.store = _open_store(store) if store else None
        self.api = ApiClient(api, token=token) if api else None
        self._info: dict = {}
        self.project = self._project(project)
        self._views: OrderedDict[tuple[str, str, str], SampleView] = OrderedDict()
        self._populations: dict[tuple[str, str], pd.DataFrame] = {}
        self._metadata: dict[str, pd.DataFrame | None] = {}
        self._thumbnails: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.thumbnail_ready = False  # set once the page server answers the thumbnail route
        self._inputs: dict[tuple[str, str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    # -- what exists ---------------------------------------------------------------------
    def describe(self) -> str:
        """One line naming the sources, for the page header."""
        parts = [f"store `{self.store.root}`" if self.store else "", f"API `{self.api.url}`" if self.api else ""]
        project = f" · project **{self.project.name}**" if self.project else ""
        return " + ".join(p for p in parts if p) + project

    @property
    def label_names(self) -> list[str]:
        """Label names from the store's metadata, else the project, else the API."""
        if self.store and self.store.meta.get("label_names"):
            return list(self.store.meta["label_names"])
        if self.project:
            return list(self.project.label_names)
        return list(self._api_info().get("label_names", []))

    def runs(self) -> list[str]:
        """Model runs known to the store or the API."""
        found = list(self.store.runs()) if self.store else []
        if self.api and not found:
            found = [_name(r, "run") for r in self._api_list("/v1/runs", "runs")]
        if not found:
            raise UIError("no model runs found: the store is empty and no API answered")
        return found

    def slices(self, run: str) -> list[str]:
        """Data slices of ``run``."""
        if self.store and run in self.store.runs():
            return list(self.store.slices(run))
        if self.api:
            entries = self._api_list("/v1/slices", "slices", run=run)
            stored_first = sorted(entries, key=lambda s: not (isinstance(s, dict) and s.get("stored", {}).get(run)))
            return [_name(s, "name") for s in stored_first]
        raise UIError(f"unknown model run {run!r}")

    def population(self, run: str, slice: str) -> pd.DataFrame:
        """The slice's samples (sample_id, gt, prediction, confidence, loss, x, y, embedding); may be empty."""
        key = (run, slice)
        if key not in self._populations:
            self._populations[key] = self._read_population(run, slice)
        return self._populations[key]

    def _read_population(self, run: str, slice: str) -> pd.DataFrame:
        if self.store and run in self.store.runs() and slice in self.store.slices(run):
            frame = self.store.samples(run, slice)
        elif self.api:
            frame = pd.DataFrame(self._api_samples(run, slice))
        else:
            raise UIError(f"unknown data slice {slice!r} for run {run!r}")
        if frame.empty:
            return pd.DataFrame(columns=SAMPLE_COLUMNS + ["embedding"])
        frame["sample_id"] = frame["sample_id"].astype(str)
        return frame.reset_index(drop=True)

    def metadata(self, slice: str) -> pd.DataFrame | None:
        """The project's scalar metadata fields of every sample of ``slice`` (index: sample id), or None
        when the project is not importable or has no metadata."""
        if slice not in self._metadata:
            self._metadata[slice] = self._read_metadata(slice)
        return self._metadata[slice]

    def _read_metadata(self, slice: str) -> pd.DataFrame | None:
        if not self.project or slice not in self.project.slices or self.project.slice(slice).metadata is None:
            return None
        ids = self.project.slice(slice).sample_ids
        try:
            rows = [self.project.metadata(slice, sid) for sid in ids]
        except (ProjectError, OSError, ValueError, KeyError):
            return None
        scalar = (str, int, float, bool, np.integer, np.floating, np.bool_)
        frame = pd.DataFrame([{k: v for k, v in (row or {}).items() if isinstance(v, scalar)} for row in rows],
                             index=pd.Index(ids, name="sample_id"))
        return frame if len(frame.columns) else None

    def thumbnail(self, slice: str, sample_id: str) -> bytes | None:
        """A small PNG of the sample for the population's hover (its first visualizer, else its first
        image connection); None for 1-D projects or without an importable project."""
        key = (slice, str(sample_id))
        if key in self._thumbnails:
            return self._thumbnails[key]
        if not self.project or slice not in self.project.slices or key[1] not in self.project.slice(slice):
            return None
        sample = self.project.sample(slice, key[1])
        first = next(iter(self.project.connections))
        if np.asarray(sample[first]).ndim != 3:
            return None
        visualizers = list(self.project.visualizers)
        image = (self.project.visualize(visualizers[0], slice, key[1]) if visualizers
                 else self.project.render(first, sample))
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
        picture.thumbnail((THUMBNAIL_PX * 2, THUMBNAIL_PX))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        with self._lock:
            self._thumbnails[key] = buffer.getvalue()
            while len(self._thumbnails) > 2000:
                self._thumbnails.popitem(last=False)
        return self._thumbnails[key]

    def input_signal(self, slice: str, sample_id: str, connection: str) -> np.ndarray | None:
        """A 1-D connection's raw values ``(C, L)`` (for drawing the signal), or None."""
        if not self.project or slice not in self.project.slices or sample_id not in self.project.slice(slice):
            return None
        values = np.asarray(self.project.sample(slice, sample_id).get(connection))
        return values if values.ndim == 2 else None

    def stored_ids(self, run: str, slice: str) -> list[str]:
        """Ids with precomputed maps in the store (empty without a store)."""
        if self.store and run in self.store.runs() and slice in self.store.slices(run):
            return self.store.sample_ids(run, slice)
        return []

    def has_sample(self, run: str, slice: str, sample_id: str | None) -> bool:
        """Whether ``sample_id`` is in the slice's population or stored maps."""
        if not sample_id:
            return False
        return sample_id in self.stored_ids(run, slice) or sample_id in set(self.population(run, slice)["sample_id"])

    def default_sample(self, run: str, slice: str) -> str | None:
        """The sample shown on load: the first stored one, else the first of the population or project."""
        ids = sorted(self.stored_ids(run, slice), key=_natural) or self.population(run, slice)["sample_id"].tolist()
        if not ids and self.project and slice in self.project.slices:
            ids = self.project.slice(slice).sample_ids
        return str(ids[0]) if ids else None

    # -- one sample ----------------------------------------------------------------------
    def view(self, run: str, slice: str, sample_id: str) -> SampleView:
        """The sample's maps and numbers, cached (switching label/depth/algorithm never re-reads)."""
        sample_id = str(sample_id).strip()
        if not sample_id:
            raise UIError("enter a sample id")
        key = (run, slice, sample_id)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        view = self._stored_view(*key) if sample_id in self.stored_ids(run, slice) else self._api_view(*key)
        with self._lock:
            self._views[key] = view
            while len(self._views) > CACHED_SAMPLES:
                self._views.popitem(last=False)
        return view

    def _stored_view(self, run: str, slice: str, sample_id: str) -> SampleView:
        maps = SampleMaps.from_rows(self.store.sample_maps(run, slice, sample_id).to_dict("records"))
        row = self._population_row(run, slice, sample_id)
        probabilities = self._probabilities(run, slice, sample_id)
        if row is None:
            raise UIError(f"sample {sample_id!r} has maps but no sample row in run {run!r}, slice {slice!r}")
        return SampleView(run, slice, sample_id, maps, int(row["prediction"]), int(row["gt"]), float(row["loss"]),
                          float(row["confidence"]), probabilities, self._faithfulness(run, slice, sample_id))

    def _faithfulness(self, run: str, slice: str, sample_id: str) -> dict[tuple[str, str, str, int], float]:
        """The sample's stored faithfulness scores (empty when the job ran without ``--faithfulness``)."""
        if not self.store.meta.get("faithfulness"):
            return {}
        frame = self.store.sample_faithfulness(run, slice, sample_id)
        return {(str(r.connection), str(r.algorithm), str(r.layer), int(r.label)): float(r.score)
                for r in frame.itertuples()}

    def faithfulness_note(self) -> str:
        """How the stored faithfulness score was measured, for the layer info line."""
        meta = (self.store.meta.get("faithfulness") if self.store else None) or {}
        return f"prob. drop, top {float(meta.get('fraction', 0.1)):.0%}"

    def _api_view(self, run: str, slice: str, sample_id: str) -> SampleView:
        if not self.api:
            if sample_id in set(self.population(run, slice)["sample_id"]):
                raise UIError(f"Run {run!r} has no maps for sample {sample_id!r} (the batch job explained only part "
                              f"of slice {slice!r}; start the UI with --api to analyze it on demand)")
            raise UIError(f"Unknown sample id {sample_id!r}: not in the store for run {run!r}, slice {slice!r}")
        answer = self._api_post("/v1/analyze", {"run": run, "slice": slice, "sample_id": sample_id, "labels": "all"})
        # a layer's map is the same for every connection; only its depth differs (one row per connection)
        rows = [{**entry, "connection": connection, "depth": depth}
                for entry in answer["maps"] for connection, depth in entry["depths"].items()]
        probabilities = np.asarray(answer["probabilities"], dtype=np.float32).reshape(-1)
        analysis = answer.get("analysis") or {}
        gt = analysis.get("gt", self._ground_truth(slice, sample_id))
        loss = analysis.get("loss")
        prediction = int(answer["prediction"])
        return SampleView(run, slice, sample_id, SampleMaps.from_rows(rows), prediction, gt,
                          None if loss is None else float(loss), float(probabilities[prediction]), probabilities)

    def _population_row(self, run: str, slice: str, sample_id: str) -> pd.Series | None:
        frame = self.population(run, slice)
        rows = frame[frame["sample_id"] == sample_id]
        return rows.iloc[0] if len(rows) else None

    def _probabilities(self, run: str, slice: str, sample_id: str) -> np.ndarray | None:
        """Softmax of the model's logits (one forward, no CAM); None when the project cannot run it."""
        if not self.project or run not in self.project.runs:
            return None
        try:
            import torch

            model = self.project.model(run)
            batch = self.project.load_batch(slice, [sample_id])
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            with torch.no_grad():
                logits = model(**{name: tensor.to(device) for name, tensor in batch.items()})
            return torch.softmax(logits.float(), dim=-1)[0].cpu().numpy()
        except (ProjectError, RuntimeError, OSError):
            return None

    def _ground_truth(self, slice: str, sample_id: str) -> int | None:
        if self.project and slice in self.project.slices and sample_id in self.project.slice(slice):
            return self.project.ground_truth(slice, sample_id)
        return None

    def input_image(self, slice: str, sample_id: str, connection: str) -> np.ndarray | None:
        """The connection's input rendered as RGB uint8 (cached), or None without an importable project."""
        key = (slice, sample_id, connection)
        if key not in self._inputs:
            if not self.project or slice not in self.project.slices or sample_id not in self.project.slice(slice):
                return None
            if self.input_signal(slice, sample_id, connection) is not None:
                return None  # a 1-D input is drawn as a signal, not an image
            if len(self._inputs) >= 4 * CACHED_SAMPLES:
                self._inputs.clear()
            self._inputs[key] = self.project.render(connection, self.project.sample(slice, sample_id))
        return self._inputs[key]

    def visualizers(self) -> list[str]:
        """Names of the project's visualizers (empty without a project)."""
        return list(self.project.visualizers) if self.project else []

    def visualize(self, name: str, slice: str, sample_id: str) -> np.ndarray | None:
        """A project visualizer's picture of the sample, or None when unavailable."""
        if not self.project or slice not in self.project.slices or sample_id not in self.project.slice(slice):
            return None
        return self.project.visualize(name, slice, sample_id)

    def similar(self, run: str, slice: str, sample_id: str, k: int = 5) -> list[str]:
        """The ``k`` nearest samples in embedding space (the store's embeddings, else the API)."""
        frame = self.population(run, slice)
        if "embedding" in frame and sample_id in set(frame["sample_id"]):
            try:
                return similar_ids(frame["sample_id"].tolist(), frame["embedding"].tolist(), sample_id, k)
            except ValueError as error:
                raise UIError(str(error)) from error
        if self.api:
            answer = self._api_get("/v1/similar", run=run, slice=slice, sample_id=sample_id, k=k)
            return [str(item["sample_id"]) for item in answer["neighbors"]]
        raise UIError(f"Unknown sample id {sample_id!r}: it has no embedding in run {run!r}, slice {slice!r}")

    def confusion(self, run: str, slice: str) -> np.ndarray:
        """The slice's confusion matrix, rows = ground truth, columns = prediction."""
        frame = self.population(run, slice)
        size = max(len(self.label_names), 1)
        matrix = np.zeros((size, size), dtype=np.int64)
        if not frame.empty:
            np.add.at(matrix, (frame["gt"].to_numpy(int), frame["prediction"].to_numpy(int)), 1)
        return matrix

    # -- helpers -------------------------------------------------------------------------
    def _project(self, override: str | None) -> Project | None:
        spec = override or (self.store.meta.get("project_spec") if self.store else None)
        if not spec and self.api:
            spec = self._api_info().get("project_spec")
        if not spec:
            return None
        try:
            return load_project(spec)
        except ProjectError:
            return None  # browse without inputs rather than refuse to start

    def _api_info(self) -> dict:
        """The API's /v1/runs answer (project, label names, runs), fetched once."""
        if self.api and not self._info:
            try:
                answer = self.api.get("/v1/runs")
            except ApiError:
                return {}
            self._info = answer if isinstance(answer, dict) else {}
        return self._info

    def _api_samples(self, run: str, slice: str) -> list[dict]:
        """Every sample row of a slice from the API, page by page (at most MAX_POPULATION)."""
        rows: list[dict] = []
        while len(rows) < MAX_POPULATION:
            page = self._api_get("/v1/samples", run=run, slice=slice, offset=len(rows), limit=API_PAGE)
            rows.extend(page["samples"])
            if not page["samples"] or len(rows) >= page["total"]:
                break
        return rows

    def _api_list(self, path: str, key: str, **params) -> list:
        answer = self._api_get(path, **params)
        return answer.get(key, []) if isinstance(answer, dict) else list(answer)

    def _api_get(self, path: str, **params):
        try:
            return self.api.get(path, **params)
        except ApiError as error:
            raise UIError(str(error)) from error

    def _api_post(self, path: str, body: dict):
        try:
            return self.api.post(path, body)
        except ApiError as error:
            raise UIError(str(error)) from error


def _natural(sample_id: str) -> tuple[int, str]:
    """Sort key putting "9" before "10"."""
    return len(sample_id), sample_id


def _name(item, key: str) -> str:
    """An API list entry's name (entries are dicts like {"run": ...} or plain strings)."""
    return str(item[key] if isinstance(item, dict) else item)


def _open_store(root: str):
    from camscope.store import Store, StoreError

    try:
        return Store(root)
    except StoreError as error:
        raise UIError(str(error)) from error
