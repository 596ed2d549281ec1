"""The Parquet store written by ``camscope run`` and read by the server and the UI, on a local
directory or object storage (``s3://bucket/prefix``; see :mod:`camscope.storage`).

Layout (schema fixed by the contract; DIR = the store's directory or prefix)::

    DIR/_camscope.json                          metadata: schema version, labels, policy, layers, shard grid
    DIR/heatmaps/R/S/shard-000000.parquet       one row per (sample, connection, algorithm, layer, label)
    DIR/faithfulness/R/S/shard-000000.parquet   optional (``--faithfulness``): one score per map of the prediction
    DIR/samples/R/S/samples.parquet             one row per sample of the slice, with its 2-D projections
    DIR/_camscope.locks/<job>.json              the writing job's lock (:mod:`camscope.joblock`)

The partition directories are plain names, not hive ``run=R``: every file holds its ``run`` and
``slice`` columns as plain strings, and hive names would make ``pq.read_table("DIR/heatmaps")`` fail
on the duplicate (string vs dictionary) columns.

Exactly once per key: each slice is cut into a fixed grid of shards (``shard_size`` samples in the
slice's order, recorded in the metadata on the first job and used by every later one), so the key of
a sample's rows depends on nothing a job's arguments change (``--batch-size``, ``--limit``, filters).
A shard's objects are committed whole (:func:`camscope.storage.write_bytes`: one PUT, or write +
fsync + rename locally), its heatmap object last; that object's footer lists the ids the shard
covers, so a later, larger job rewrites a partial shard under the same key. Readers list only
heatmap objects, so they see whole shards and nothing of a killed writer.

Examples:
    >>> store = Store("s3://bucket/demo-store")       # or a local directory
    >>> store.runs(), store.slices("cnn")
    (['cnn', 'cnn-small'], ['train', 'validation'])
    >>> rows = store.sample_maps("cnn", "validation", "4000")
    >>> store.heatmap(rows.iloc[0]).shape      # (height, width), float32, dequantized
    (8, 8)
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camscope.heatmap import dequantize
from camscope.storage import (Location, StorageError, check_bucket, explain_error, list_directories, list_files,
                              read_bytes, resolve, write_bytes)

if TYPE_CHECKING:  # pandas only types the readers' results (pyarrow imports it for to_pandas)
    import pandas as pd

SCHEMA_VERSION = 2
META_FILE = "_camscope.json"
HEATMAPS = "heatmaps"
SAMPLES = "samples"
SAMPLES_FILE = "samples.parquet"
#: Optional per-map faithfulness scores (``camscope run --faithfulness``), beside the contract's tables.
FAITHFULNESS = "faithfulness"
#: Samples per shard of a new store (then fixed by its metadata).
DEFAULT_SHARD_SIZE = 64

#: Columns that name a sample, and a map of a sample (shared by the tables below).
SAMPLE_KEY = [("run", pa.string()), ("slice", pa.string()), ("sample_id", pa.string())]
MAP_KEY = SAMPLE_KEY + [("connection", pa.string()), ("algorithm", pa.string()), ("layer", pa.string())]

HEATMAP_SCHEMA = pa.schema(
    MAP_KEY
    + [
        ("depth", pa.int64()),
        ("label", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("heatmap", pa.binary()),
        ("scale", pa.float32()),
    ]
)

#: The 2-D projections of the population, computed once per slice by the job: ``x, y`` (the contract's
#: default, = PCA) and one pair per method.
PROJECTIONS = ("pca", "umap", "tsne")
PROJECTION_COLUMNS = [f"{method}_{axis}" for method in PROJECTIONS for axis in ("x", "y")]

SAMPLE_SCHEMA = pa.schema(
    SAMPLE_KEY
    + [
        ("gt", pa.int64()),
        ("prediction", pa.int64()),
        ("confidence", pa.float32()),
        ("loss", pa.float32()),
        ("embedding", pa.list_(pa.float32())),
        ("x", pa.float32()),
        ("y", pa.float32()),
    ]
    + [(name, pa.float32()) for name in PROJECTION_COLUMNS]
)

#: ``DIR/faithfulness/R/S/<shard>.parquet``: one score per (sample, connection, algorithm, layer) for
#: the sample's predicted label (not part of the contract's tables; written only with ``--faithfulness``).
FAITHFULNESS_SCHEMA = pa.schema(MAP_KEY + [("label", pa.int64()), ("score", pa.float32())])

#: Footer metadata of a heatmap shard / samples table: the ids it covers (JSON list, slice order) and
#: the ids that failed with their reasons (JSON object).
COVERED_KEY = b"camscope.ids"
FAILED_KEY = b"camscope.failed"


class StoreError(StorageError):
    """The store is missing, unreachable, has another schema version, or holds no such run / slice / sample."""


# ------------------------------------------------------------------------------------ locations and names
def open_location(root: str | Path | Location) -> Location:
    """Resolve a store path or URI (StoreError, one line, for a scheme, bucket or access problem)."""
    if isinstance(root, Location):
        return root
    try:
        location = resolve(root)
        check_bucket(location)
    except StorageError as error:
        raise StoreError(str(error)) from None
    return location


def check_name(kind: str, name: str) -> str:
    """A run or slice name usable as a directory name (no separators, no leading dot or underscore)."""
    if not name or "/" in name or "\\" in name or name[0] in "._" or "=" in name:
        raise StoreError(f"{kind} name {name!r} cannot be stored: use no '/', '\\', '=' or leading '.' / '_'")
    return name


def partition(location: Location, table: str, run: str, slice: str) -> str:
    """The directory (prefix) of one (run, slice) partition of ``table``."""
    return location.join(table, check_name("run", run), check_name("slice", slice))


def shard_name(index: int) -> str:
    """The file stem of shard ``index`` of a slice."""
    return f"shard-{index:06d}"


def shard_grid(sample_ids: Sequence[str], shard_size: int) -> list[tuple[str, list[str]]]:
    """The slice's fixed grid: ``(shard name, its sample ids)`` for every shard, in the slice's order."""
    ids = [str(sid) for sid in sample_ids]
    return [(shard_name(start // shard_size), ids[start : start + shard_size]) for start in range(0, len(ids), shard_size)]


def shard_file(location: Location, table: str, run: str, slice: str, shard: str) -> str:
    """Where one shard of ``table`` (heatmaps or faithfulness) lives."""
    return f"{partition(location, table, run, slice)}/{shard}.parquet"


def samples_file(location: Location, run: str, slice: str) -> str:
    """The samples table of one (run, slice)."""
    return f"{partition(location, SAMPLES, run, slice)}/{SAMPLES_FILE}"


# ------------------------------------------------------------------------------------ writing
def table_bytes(table: pa.Table, metadata: Mapping[bytes, bytes] | None = None) -> pa.Buffer:
    """``table`` as one Parquet file in memory (zstd), with extra footer metadata."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    # dictionaries and min/max statistics pay for key columns only: on the heatmap bytes they cost a
    # third of the write (every value hashed and compared) and never help a reader; a float column
    # (scales, scores, coordinates) is nearly all distinct values, so its dictionary is larger than
    # the plain values and costs three times as much to write
    keys = [field.name for field in table.schema if not _is_payload(field.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=keys, write_statistics=keys)
    return sink.getvalue()


def _is_payload(kind: pa.DataType) -> bool:
    """A column of values (map bytes, embeddings, float measurements), not keys a reader filters on."""
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_list(kind)
            or pa.types.is_floating(kind))


def write_table(location: Location, path: str, table: pa.Table, metadata: Mapping[bytes, bytes] | None = None,
                job: str = "w") -> None:
    """Commit ``table`` as one whole Parquet object at ``path``."""
    write_bytes(location, path, table_bytes(table, metadata), job=job)


def write_shard(location: Location, run: str, slice: str, shard: str, heatmaps: pa.Table, covered: Sequence[str],
                failed: Mapping[str, str] | None = None, faithfulness: pa.Table | None = None, job: str = "w") -> None:
    """Commit one shard: its faithfulness scores (when given) first, the heatmap object last, so the
    heatmap object's existence means the whole shard is there. ``covered``: every id the shard was
    asked for (explained or failed), recorded in the footer."""
    if faithfulness is not None:
        write_table(location, shard_file(location, FAITHFULNESS, run, slice, shard),
                    faithfulness.cast(FAITHFULNESS_SCHEMA), job=job)
    metadata = {COVERED_KEY: json.dumps(list(covered)).encode(), FAILED_KEY: json.dumps(dict(failed or {})).encode()}
    write_table(location, shard_file(location, HEATMAPS, run, slice, shard), heatmaps.cast(HEATMAP_SCHEMA),
                metadata, job=job)


def write_samples(location: Location, run: str, slice: str, table: pa.Table, failed: Mapping[str, str],
                  job: str = "w") -> None:
    """Commit the samples table of one (run, slice) (ids that could not be forwarded in the footer)."""
    covered = table.column("sample_id").to_pylist() + list(failed)
    write_table(location, samples_file(location, run, slice), table.cast(SAMPLE_SCHEMA),
                {COVERED_KEY: json.dumps(covered).encode(), FAILED_KEY: json.dumps(dict(failed)).encode()}, job=job)


def footer(location: Location, path: str) -> tuple[list[str], dict[str, str]]:
    """``(covered ids, {failed id: reason})`` from the footer of a shard or samples table."""
    with location.fs.open_input_file(path) as handle:
        metadata = pq.read_schema(handle).metadata or {}
    failed = json.loads(metadata.get(FAILED_KEY, b"{}"))
    if isinstance(failed, list):
        failed = {sid: "failed to load" for sid in failed}
    return json.loads(metadata.get(COVERED_KEY, b"[]")), failed


def shard_states(location: Location, run: str, slice: str) -> dict[str, tuple[list[str], dict[str, str], bool]]:
    """Committed shards of one (run, slice): name -> (covered ids, failures, has faithfulness scores)."""
    scored = {info.base_name for info in list_files(location, partition(location, FAITHFULNESS, run, slice), ".parquet")}
    states = {}
    for info in list_files(location, partition(location, HEATMAPS, run, slice), ".parquet"):
        covered, failed = footer(location, info.path)
        states[info.base_name[: -len(".parquet")]] = (covered, failed, info.base_name in scored)
    return states


# ------------------------------------------------------------------------------------ metadata
def read_meta(root: str | Path | Location) -> dict | None:
    """The store's metadata, or None when there is none yet."""
    location = open_location(root)
    raw = read_bytes(location, location.join(META_FILE))
    return json.loads(raw) if raw else None


def write_meta(location: Location, meta: Mapping, job: str = "w") -> None:
    """Commit the store's metadata."""
    write_bytes(location, location.join(META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode(), job=job)


def _check_version(meta: Mapping | None, where: str = "store") -> None:
    if meta is not None and meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where} has schema_version {meta.get('schema_version')!r}, this camscope writes {SCHEMA_VERSION}"
        )


def check_schema(root: str | Path) -> None:
    """Raise StoreError if ``root`` holds a store of another schema version (a new directory is fine)."""
    _check_version(read_meta(root), f"store {str(root)!r}")


def merge_meta(old: Mapping | None, new: Mapping) -> dict:
    """Metadata of a store after a job: runs and connections accumulate across jobs; the shard grid
    of an existing store never changes."""
    _check_version(old or None)
    if old and old.get("label_names") != new.get("label_names"):
        raise StoreError("store holds another project's labels: use a fresh --out directory")
    merged = dict(old or {})
    merged.update({key: value for key, value in new.items() if key not in ("runs", "connections", "shard_size")})
    for key in ("runs", "connections"):
        merged[key] = {**(old or {}).get(key, {}), **new.get(key, {})}
    merged["shard_size"] = int((old or {}).get("shard_size") or new.get("shard_size") or DEFAULT_SHARD_SIZE)
    merged["schema_version"] = SCHEMA_VERSION
    return merged


# ------------------------------------------------------------------------------------ compatibility writers
def _file_location(path: str | Path) -> tuple[Location, str]:
    location = open_location(path)
    return location, location.root


def write_table_atomic(table: pa.Table, path: str | Path, metadata: Mapping[bytes, bytes] | None = None) -> str:
    """Commit ``table`` at the path or URI ``path`` (whole object; local: temporary file, fsync, rename)."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"expected a pyarrow Table, got {type(table).__name__}")
    location, target = _file_location(path)
    write_table(location, target, table, metadata)
    return target


def write_json_atomic(data: Any, path: str | Path) -> str:
    """Commit JSON at the path or URI ``path``."""
    location, target = _file_location(path)
    write_bytes(location, target, json.dumps(data, indent=2, sort_keys=True).encode())
    return target


def samples_path(root: str | Path, run: str, slice: str) -> str:
    """The samples table of one (run, slice) of the store at ``root`` (a path, or a URI for object storage)."""
    location = open_location(root)
    return location.describe(samples_file(location, run, slice))


def block_id(run: str, slice: str, sample_ids: Sequence[str]) -> str:
    """A name for a hand-written block of ``sample_ids`` (tests and tools; the job uses the shard grid)."""
    import hashlib

    return "block-" + hashlib.sha1("\x1f".join([run, slice, *sample_ids]).encode()).hexdigest()[:20]


def write_block(root: str | Path, run: str, slice: str, block: str, heatmaps: pa.Table, samples: pa.Table | None = None,
                failed: Sequence[str] = (), faithfulness: pa.Table | None = None) -> None:
    """Commit one block of heatmap rows under the name ``block`` (``samples`` is not stored here: the
    samples table is written whole, see :func:`write_samples`)."""
    location = open_location(root)
    covered = list(dict.fromkeys(heatmaps.column("sample_id").to_pylist())) + list(failed)
    write_shard(location, run, slice, block, heatmaps, covered, {sid: "failed to load" for sid in failed},
                faithfulness)


def block_failures(path: str | Path) -> list[str]:
    """Ids of the samples a committed shard could not explain (read from its footer)."""
    location, target = _file_location(path)
    return list(footer(location, target)[1])


# ------------------------------------------------------------------------------------ reading
class Store:
    """Read access to a store (a local directory or an object-storage URI).

    Args:
        root: what ``camscope run --out`` was given.

    Raises:
        StoreError: no ``_camscope.json`` there, another ``schema_version``, or storage that cannot
            be reached (unknown scheme, missing bucket, no credentials), each as one line.
    """

    def __init__(self, root: str | Path) -> None:
        self.location = open_location(root)
        self.root: str | Path = Path(self.location.root) if self.location.local else self.location.uri
        try:
            raw = read_bytes(self.location, self.location.join(META_FILE))
        except StorageError as error:
            raise StoreError(str(error)) from None
        except OSError as error:
            raise StoreError(str(explain_error(self.location, error, "read"))) from None
        if raw is None:
            raise StoreError(f"no camscope store at {str(self.root)!r} (missing {META_FILE}); run `camscope run` first")
        meta = json.loads(raw)
        _check_version(meta, f"store {str(self.root)!r}")
        self.meta: dict = meta
        self._files: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[str]:
        """Runs that have heatmaps or samples in the store."""
        return sorted({name for table in (HEATMAPS, SAMPLES)
                       for name in list_directories(self.location, self.location.join(table))})

    def slices(self, run: str) -> list[str]:
        """Slices of ``run`` that have heatmaps or samples in the store."""
        self._check_run(run)
        return sorted({name for table in (HEATMAPS, SAMPLES)
                       for name in list_directories(self.location, self.location.join(table, run))})

    def samples(self, run: str, slice: str) -> pd.DataFrame:
        """One row per sample of the slice: sample_id, gt, prediction, confidence, loss, embedding, x, y
        and the projections ``pca_x, pca_y, umap_x, umap_y, tsne_x, tsne_y``."""
        table = self._samples_table(run, slice)
        return table.drop_columns(["run", "slice"]).to_pandas()

    def sample_ids(self, run: str, slice: str) -> list[str]:
        """Ids of the samples with heatmaps, in the samples table's order (the slice's order)."""
        with_maps = self._block_index(run, slice)
        ordered = self._samples_table(run, slice, ["sample_id"]).column("sample_id").to_pylist()
        return [sid for sid in ordered if sid in with_maps] + sorted(set(with_maps) - set(ordered))

    def sample_maps(self, run: str, slice: str, sample_id: str, connection: str | None = None,
                    algorithm: str | None = None, layer: str | None = None, label: int | None = None) -> pd.DataFrame:
        """Every heatmap row of one sample (optionally only one connection / algorithm / layer / label):
        connection, algorithm, layer, depth, label, height, width, heatmap, scale."""
        sample_id = str(sample_id)
        files = self._block_index(run, slice).get(sample_id)
        if not files:
            raise StoreError(f"unknown sample id {sample_id!r} in run {run!r} slice {slice!r}")
        expression = pc.field("sample_id") == sample_id
        for column, value in (("connection", connection), ("algorithm", algorithm), ("layer", layer), ("label", label)):
            if value is not None:
                expression &= pc.field(column) == value
        columns = [name for name in HEATMAP_SCHEMA.names if name not in ("run", "slice", "sample_id")]
        tables = [self._read(path, columns, expression, HEATMAP_SCHEMA) for path in files]
        return pa.concat_tables(tables).to_pandas()

    def sample_faithfulness(self, run: str, slice: str, sample_id: str) -> pd.DataFrame:
        """The stored faithfulness scores of one sample (``camscope run --faithfulness``): connection,
        algorithm, layer, label, score; an empty frame when the store has none for it."""
        sample_id = str(sample_id)
        columns = [name for name in FAITHFULNESS_SCHEMA.names if name not in ("run", "slice", "sample_id")]
        files = self._block_index(run, slice).get(sample_id, [])
        scored = {info.path for info in list_files(self.location, partition(self.location, FAITHFULNESS, run, slice))}
        paths = [shard_file(self.location, FAITHFULNESS, run, slice, path.rsplit("/", 1)[-1][: -len(".parquet")])
                 for path in files]
        tables = [self._read(path, columns, pc.field("sample_id") == sample_id, FAITHFULNESS_SCHEMA)
                  for path in paths if path in scored]
        if not tables:
            return FAITHFULNESS_SCHEMA.empty_table().select(columns).to_pandas()
        return pa.concat_tables(tables).to_pandas()

    @staticmethod
    def heatmap(row: Mapping[str, Any] | pd.Series) -> np.ndarray:
        """The dequantized float32 map ``(height, width)`` of one heatmap row."""
        return dequantize(row["heatmap"], row["scale"], (int(row["height"]), int(row["width"])))

    def layers(self, run: str) -> list[dict]:
        """The run's layers as stored in the metadata: name, depth (connection -> int), shape."""
        self._check_run(run)
        return list(self.meta.get("runs", {}).get(run, {}).get("layers", []))

    # -------------------------------------------------------------------------- internals
    def _read(self, path: str, columns: list[str] | None, filters: Any, schema: pa.Schema) -> pa.Table:
        return pq.read_table(path, columns=columns, filters=filters, schema=schema, filesystem=self.location.fs)

    def _check_run(self, run: str) -> None:
        if run not in self.runs():
            raise StoreError(f"unknown run {run!r}; the store has {self.runs()}")

    def _check_slice(self, run: str, slice: str) -> None:
        if slice not in self.slices(run):
            raise StoreError(f"unknown slice {slice!r} for run {run!r}; the store has {self.slices(run)}")

    def _samples_table(self, run: str, slice: str, columns: list[str] | None = None) -> pa.Table:
        self._check_slice(run, slice)
        path = samples_file(self.location, run, slice)
        if self.location.fs.get_file_info(path).type != pafs.FileType.File:
            empty = SAMPLE_SCHEMA.empty_table()
            return empty.select(columns) if columns else empty
        return self._read(path, columns, None, SAMPLE_SCHEMA)

    def _block_index(self, run: str, slice: str) -> dict[str, list[str]]:
        """sample id -> the heatmap shards holding its rows; a shard's ids are re-read when it changes."""
        self._check_slice(run, slice)
        infos = list_files(self.location, partition(self.location, HEATMAPS, run, slice), ".parquet")
        index: dict[str, list[str]] = {}
        for info in infos:
            stamp = (info.mtime_ns or 0, info.size or 0)
            with self._lock:
                cached = self._files.get(info.path)
            if cached is None or cached[0] != stamp:
                column = self._read(info.path, ["sample_id"], None, HEATMAP_SCHEMA).column("sample_id")
                cached = (stamp, pc.unique(column).to_pylist())
                with self._lock:
                    self._files[info.path] = cached
            for sid in cached[1]:
                index.setdefault(sid, []).append(info.path)
        return index


# ------------------------------------------------------------------------------------ whole stores
def store_path(text: str) -> str | Path:
    """A ``--out`` / ``--store`` argument as the code passes it on: a URI stays a string, a path a Path."""
    return text if "://" in text else Path(text).expanduser()


def remove_store(root: str | Path) -> None:
    """Delete a whole store (``camscope demo --fresh``), on a local directory or object storage."""
    location = open_location(root)
    info = location.fs.get_file_info(location.root)
    if info.type == pafs.FileType.Directory or not location.local:
        location.fs.delete_dir_contents(location.root, missing_dir_ok=True)
