"""The Parquet store written by ``camscope run`` and read by the server and the UI.

Layout (schema fixed by the contract)::

    DIR/_camscope.json                              metadata: schema version, labels, policy, layers
    DIR/heatmaps/R/S/<block-id>.parquet   one row per (sample, connection, algorithm, layer, label) of run R, slice S
    DIR/samples/R/S/samples.parquet       one row per sample, with its 2-D projection
    DIR/faithfulness/R/S/<block-id>.parquet   optional (``--faithfulness``): one score per map of the predicted label

The partition directories are plain names, not hive ``run=R``: every file holds its ``run`` and
``slice`` columns as plain strings, and hive names would make ``pq.read_table("DIR/heatmaps")`` fail
on the duplicate (string vs dictionary) columns.

Every file is written to a temporary name in its final directory and renamed into place, so a
reader (which ignores names starting with ``.`` or ``_``) only ever sees whole files. Block ids are
a hash of the block's sample ids: a re-run writes the same names, so it replaces rather than
duplicates, and a block whose file exists is complete.

Examples:
    >>> store = Store("demo-store")
    >>> store.runs(), store.slices("cnn")
    (['cnn', 'wide'], ['validation'])
    >>> rows = store.sample_maps("cnn", "validation", "4000")
    >>> store.heatmap(rows.iloc[0]).shape      # (height, width), float32, dequantized
    (8, 8)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from camscope.heatmap import dequantize

SCHEMA_VERSION = 1
META_FILE = "_camscope.json"
HEATMAPS = "heatmaps"
SAMPLES = "samples"
SAMPLES_FILE = "samples.parquet"
#: Optional per-map faithfulness scores (``camscope run --faithfulness``), beside the contract's tables.
FAITHFULNESS = "faithfulness"
#: Per-block sample rows wait here until the job joins them and adds the 2-D projection.
STAGING = "_staging"

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
)

#: ``DIR/faithfulness/R/S/<block-id>.parquet``: one score per (sample, connection, algorithm, layer) for
#: the sample's predicted label (not part of the contract's tables; written only with ``--faithfulness``).
FAITHFULNESS_SCHEMA = pa.schema(MAP_KEY + [("label", pa.int64()), ("score", pa.float32())])

#: Metadata key of a heatmap block holding the ids of samples that failed to load (JSON list).
FAILED_KEY = b"camscope.failed"


class StoreError(ValueError):
    """The store is missing, has another schema version, or holds no such run / slice / sample."""


# ------------------------------------------------------------------------------------ paths
def check_name(kind: str, name: str) -> str:
    """A run or slice name usable as a directory name (no separators, no leading dot or underscore)."""
    if not name or "/" in name or "\\" in name or name[0] in "._" or "=" in name:
        raise StoreError(f"{kind} name {name!r} cannot be stored: use no '/', '\\', '=' or leading '.' / '_'")
    return name


def run_directory(root: str | Path, table: str, run: str) -> Path:
    """The directory of one run's partitions of ``table``."""
    return Path(root) / table / check_name("run", run)


def partition(root: str | Path, table: str, run: str, slice: str) -> Path:
    """The directory of one (run, slice) partition of ``table`` (``heatmaps``, ``samples``, staging)."""
    return run_directory(root, table, run) / check_name("slice", slice)


def block_id(run: str, slice: str, sample_ids: Sequence[str]) -> str:
    """Deterministic name of a block: the same samples always give the same id."""
    digest = hashlib.sha1("\x1f".join([run, slice, *sample_ids]).encode()).hexdigest()
    return f"block-{digest[:20]}"


def heatmap_block_path(root: str | Path, run: str, slice: str, block: str) -> Path:
    """Where the heatmap rows of ``block`` live once complete."""
    return partition(root, HEATMAPS, run, slice) / f"{block}.parquet"


def faithfulness_block_path(root: str | Path, run: str, slice: str, block: str) -> Path:
    """Where the faithfulness scores of ``block`` live (same block id as its heatmap file)."""
    return partition(root, FAITHFULNESS, run, slice) / f"{block}.parquet"


def staged_samples_path(root: str | Path, run: str, slice: str, block: str) -> Path:
    """Where the sample rows of ``block`` wait for the 2-D projection."""
    return partition(root, STAGING + "/" + SAMPLES, run, slice) / f"{block}.parquet"


def samples_path(root: str | Path, run: str, slice: str) -> Path:
    """The final samples table of one (run, slice)."""
    return partition(root, SAMPLES, run, slice) / SAMPLES_FILE


def _visible(directory: Path) -> list[Path]:
    """Complete parquet files of a directory (temporary files start with ``.``)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".parquet" and p.name[0] not in "._")


# ------------------------------------------------------------------------------------ writing
def write_table_atomic(table: pa.Table, path: str | Path, metadata: Mapping[bytes, bytes] | None = None) -> Path:
    """Write ``table`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Write JSON to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def write_block(root: str | Path, run: str, slice: str, block: str, heatmaps: pa.Table, samples: pa.Table,
                failed: Sequence[str] = (), faithfulness: pa.Table | None = None) -> None:
    """Commit one block: its sample rows (and faithfulness scores, when given) are written first, the
    heatmap file is renamed in last, so the heatmap file's existence means the whole block is done."""
    write_table_atomic(samples.cast(SAMPLE_SCHEMA), staged_samples_path(root, run, slice, block))
    if faithfulness is not None:
        write_table_atomic(faithfulness.cast(FAITHFULNESS_SCHEMA), faithfulness_block_path(root, run, slice, block))
    write_table_atomic(heatmaps.cast(HEATMAP_SCHEMA), heatmap_block_path(root, run, slice, block),
                       metadata={FAILED_KEY: json.dumps(list(failed)).encode()})


def remove_temporaries(root: str | Path, run: str, slice: str) -> int:
    """Delete temporary files a killed writer left in one (run, slice); only safe while no job writes there."""
    removed = 0
    for table in (HEATMAPS, STAGING + "/" + SAMPLES, SAMPLES, FAITHFULNESS):
        directory = partition(root, table, run, slice)
        for path in directory.glob(".*.tmp") if directory.is_dir() else []:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def block_failures(path: str | Path) -> list[str]:
    """Ids of the samples a complete block could not load (read from the file's footer)."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(FAILED_KEY, b"[]"))


def staged_samples(root: str | Path, run: str, slice: str) -> pa.Table:
    """Every staged sample row of one (run, slice), ordered by block then sample."""
    files = _visible(partition(root, STAGING + "/" + SAMPLES, run, slice))
    tables = [pq.read_table(path, schema=SAMPLE_SCHEMA) for path in files]
    return pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()


def read_meta(root: str | Path) -> dict | None:
    """The store's metadata, or None when there is none yet."""
    path = Path(root) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _check_version(meta: Mapping | None, where: str = "store") -> None:
    if meta is not None and meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where} has schema_version {meta.get('schema_version')!r}, this camscope writes {SCHEMA_VERSION}"
        )


def check_schema(root: str | Path) -> None:
    """Raise StoreError if ``root`` holds a store of another schema version (a new directory is fine)."""
    _check_version(read_meta(root))


def merge_meta(old: Mapping | None, new: Mapping) -> dict:
    """Metadata of a store after a job: runs and connections accumulate across jobs."""
    _check_version(old or None)
    if old and old.get("label_names") != new.get("label_names"):
        raise StoreError("store holds another project's labels: use a fresh --out directory")
    merged = dict(old or {})
    merged.update({key: value for key, value in new.items() if key not in ("runs", "connections")})
    for key in ("runs", "connections"):
        merged[key] = {**(old or {}).get(key, {}), **new.get(key, {})}
    merged["schema_version"] = SCHEMA_VERSION
    return merged


# ------------------------------------------------------------------------------------ reading
class Store:
    """Read access to a store directory.

    Args:
        root: the directory ``camscope run --out`` wrote.

    Raises:
        StoreError: no ``_camscope.json`` there, or another ``schema_version``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = read_meta(self.root) if self.root.is_dir() else None
        if meta is None:
            raise StoreError(f"no camscope store at {str(self.root)!r} (missing {META_FILE}); run `camscope run` first")
        _check_version(meta, f"store {str(self.root)!r}")
        self.meta: dict = meta
        self._index: dict[tuple[str, str], tuple[list[Path], dict[str, list[Path]]]] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[str]:
        """Runs that have heatmaps or samples in the store."""
        return sorted({p.name for table in (HEATMAPS, SAMPLES) for p in _children(self.root / table)})

    def slices(self, run: str) -> list[str]:
        """Slices of ``run`` that have heatmaps or samples in the store."""
        self._check_run(run)
        return sorted({p.name for table in (HEATMAPS, SAMPLES)
                       for p in _children(run_directory(self.root, table, run))})

    def samples(self, run: str, slice: str) -> pd.DataFrame:
        """One row per sample: sample_id, gt, prediction, confidence, loss, embedding, x, y."""
        path = self._samples_file(run, slice)
        table = pq.read_table(path, schema=SAMPLE_SCHEMA) if path.is_file() else staged_samples(self.root, run, slice)
        return table.drop_columns(["run", "slice"]).to_pandas()

    def sample_ids(self, run: str, slice: str) -> list[str]:
        """Ids of the samples with heatmaps, in the samples table's order (the slice's order)."""
        with_maps = self._block_index(run, slice)
        path = samples_path(self.root, run, slice)
        ordered = pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist() if path.is_file() else []
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
        tables = [pq.read_table(path, columns=columns, filters=expression, schema=HEATMAP_SCHEMA) for path in files]
        return pa.concat_tables(tables).to_pandas()

    def sample_faithfulness(self, run: str, slice: str, sample_id: str) -> pd.DataFrame:
        """The stored faithfulness scores of one sample (``camscope run --faithfulness``): connection,
        algorithm, layer, label, score; an empty frame when the store has none for it."""
        sample_id = str(sample_id)
        columns = [name for name in FAITHFULNESS_SCHEMA.names if name not in ("run", "slice", "sample_id")]
        files = self._block_index(run, slice).get(sample_id, [])
        paths = [faithfulness_block_path(self.root, run, slice, path.stem) for path in files]
        tables = [pq.read_table(path, columns=columns, filters=pc.field("sample_id") == sample_id,
                                schema=FAITHFULNESS_SCHEMA) for path in paths if path.is_file()]
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
    def _check_run(self, run: str) -> None:
        if run not in self.runs():
            raise StoreError(f"unknown run {run!r}; the store has {self.runs()}")

    def _samples_file(self, run: str, slice: str) -> Path:
        if slice not in self.slices(run):
            raise StoreError(f"unknown slice {slice!r} for run {run!r}; the store has {self.slices(run)}")
        return samples_path(self.root, run, slice)

    def _block_index(self, run: str, slice: str) -> dict[str, list[Path]]:
        """sample id -> the block files holding its heatmaps; rebuilt when blocks appear."""
        self._samples_file(run, slice)
        files = _visible(partition(self.root, HEATMAPS, run, slice))
        key = (run, slice)
        with self._lock:
            indexed_files, index = self._index.get(key, (None, {}))
            if indexed_files != files:
                index = {}
                for path in files:
                    ids = pq.read_table(path, columns=["sample_id"]).column("sample_id")
                    for sid in pc.unique(ids).to_pylist():
                        index.setdefault(sid, []).append(path)
                self._index[key] = (files, index)
        return index


def _children(directory: Path) -> Iterable[Path]:
    return [p for p in directory.iterdir() if p.is_dir() and p.name[0] not in "._"] if directory.is_dir() else []
