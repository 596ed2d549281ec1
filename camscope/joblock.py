"""One writing job per store: a lock that works on object storage, where there is no atomic
create-if-absent and no rename.

A job writes ``_camscope.locks/<job>.json`` (job id, host, pid), keeps it fresh (a heartbeat rewrite
every ``HEARTBEAT_S``), then lists the lock directory. Another lock that is live and was written no
later than ours (by the storage's own clock) means another job holds the store: ours is removed and
the job refuses with a one-line error. Two jobs that list before either sees the other cannot both
proceed: the later writer always sees the earlier one (object stores list after write consistently),
and on a tie both refuse. A lock is abandoned, and removed, when its process is gone (same host) or
its heartbeat is older than ``STALE_S``; local temporaries of a job without a live lock are removed
with it.

Examples:
    >>> with JobLock(resolve("s3://bucket/store")) as lock:
    ...     lock.job          # names this job's local temporaries
    '5f0c...'
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pyarrow.fs as pafs

from camscope.storage import (Location, StorageError, delete, explain_error, host_name, read_bytes,
                              remove_temporaries, write_bytes)

LOCKS = "_camscope.locks"
HEARTBEAT_S = 15.0
STALE_S = 90.0


class StoreBusyError(StorageError):
    """Another job is writing the store."""


class JobLock:
    """Exclusive right to write one store, for the duration of a ``with`` block."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.job = uuid.uuid4().hex
        self.path = location.join(LOCKS, f"{self.job}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the store or raise StoreBusyError; removes what abandoned jobs left."""
        self._write()
        try:
            mine, others = self._locks()
            live = set()
            for info, record in others:
                if self._abandoned(info, record, mine):
                    delete(self.location, info.path)
                    continue
                if info.mtime_ns <= mine.mtime_ns:
                    raise StoreBusyError(
                        f"another camscope job is writing {self.location.uri} (host {record.get('host')}, "
                        f"pid {record.get('pid')}); wait for it to finish, or remove "
                        f"{self.location.describe(info.path)} if that job is gone")
                live.add(info.base_name[: -len(".json")])
            remove_temporaries(self.location, live | {self.job})
        except BaseException:
            delete(self.location, self.path)
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="camscope-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat, remove this job's leftover temporaries and its lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        remove_temporaries(self.location, self._live_jobs() - {self.job})
        delete(self.location, self.path)

    # ------------------------------------------------------------------------------ internals
    def _write(self) -> None:
        record = {"job": self.job, "host": host_name(), "pid": os.getpid(), "written": time.time()}
        try:
            write_bytes(self.location, self.path, json.dumps(record).encode(), job=self.job)
        except OSError as error:
            raise explain_error(self.location, error, "write to") from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except (OSError, StorageError):
                pass  # a missed beat only ages the lock; the next one retries

    def _locks(self) -> tuple[pafs.FileInfo, list[tuple[pafs.FileInfo, dict]]]:
        entries = self.location.fs.get_file_info(pafs.FileSelector(self.location.join(LOCKS), allow_not_found=True))
        mine, others = None, []
        for info in entries:
            if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
                continue
            if info.path.rstrip("/").endswith(f"{self.job}.json"):
                mine = info
                continue
            raw = read_bytes(self.location, info.path)
            try:
                record = json.loads(raw) if raw else {}
            except ValueError:
                record = {}
            others.append((info, record))
        if mine is None:
            raise StorageError(f"cannot see this job's own lock in {self.location.uri}: the storage does not list "
                               "what was just written")
        return mine, others

    def _live_jobs(self) -> set[str]:
        entries = self.location.fs.get_file_info(pafs.FileSelector(self.location.join(LOCKS), allow_not_found=True))
        return {e.base_name[: -len(".json")] for e in entries if e.base_name.endswith(".json")}

    @staticmethod
    def _abandoned(info: pafs.FileInfo, record: dict, mine: pafs.FileInfo) -> bool:
        if mine.mtime_ns - info.mtime_ns > STALE_S * 1e9:
            return True
        if record.get("host") == host_name() and isinstance(record.get("pid"), int):
            return not _alive(record["pid"])
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
