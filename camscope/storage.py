"""Where a store lives: a local directory or an object-storage URI (``s3://bucket/prefix``, and anything
else ``pyarrow.fs`` or fsspec resolves), with one commit primitive that holds on both.

S3 settings come from the standard AWS environment, as with every other tool: credentials from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a profile or an instance
profile; the region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``; an S3-compatible endpoint (MinIO,
Ceph, moto) from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (pyarrow's S3 client does not read
these two itself, so they are passed as ``endpoint_override``).

Commit: on a local file system a file is written to ``.<name>-<job>.tmp`` beside its final name,
fsynced, renamed into place and the directory fsynced; on object storage it is one PUT of the whole
object at its final key (atomic: a killed writer leaves no object, or the previous one).

Examples:
    >>> location = resolve("s3://my-bucket/stores/demo")
    >>> location.join("heatmaps", "cnn")
    'my-bucket/stores/demo/heatmaps/cnn'
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

#: Temporary files of a local commit: ``.<name>-<job id>.tmp`` (readers skip names starting with '.').
TMP_SUFFIX = ".tmp"
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                         "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                         "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class StorageError(ValueError):
    """A store location that cannot be used: unknown scheme, missing bucket, no access (one line)."""


@dataclass(frozen=True)
class Location:
    """A resolved store location: the file system and the root path inside it."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def local(self) -> bool:
        """True for a directory of this machine (commits use temporary files and renames)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        """The path of ``parts`` below the root, inside :attr:`fs`."""
        return "/".join([self.root.rstrip("/"), *parts])

    def describe(self, path: str) -> str:
        """``path`` as the user would write it (a URI for object storage)."""
        if self.local:
            return path
        scheme = urlsplit(self.uri).scheme
        return f"{scheme}://{path}"


# ------------------------------------------------------------------------------------ resolving
def resolve(uri: str | Path) -> Location:
    """The file system and root of a local path or a URI; StorageError for a scheme nobody handles."""
    text = str(uri)
    scheme = urlsplit(text).scheme if "://" in text else ""
    if not scheme or scheme == "file":
        path = Path(text[len("file://"):] if scheme else text).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), str(path), str(path))
    if scheme in ("s3", "s3a") and "?" not in text:
        parts = urlsplit(text)
        if not parts.netloc:
            raise StorageError(f"{text!r} names no bucket: use s3://bucket/prefix")
        return Location(s3_filesystem(), f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/"), text.rstrip("/"))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as error:
        fs, path = _fsspec(text, scheme, error)
    return Location(fs, path.rstrip("/"), text.rstrip("/"))


def _fsspec(uri: str, scheme: str, error: Exception) -> tuple[pafs.FileSystem, str]:
    """pyarrow does not handle ``scheme``: try fsspec (gcsfs, adlfs, ... when installed)."""
    try:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(uri)
    except ImportError as missing:
        raise StorageError(f"{scheme}:// needs a package that is not installed ({missing.name})") from None
    except (ValueError, KeyError):
        raise StorageError(f"no file system handles {scheme}:// URIs ({_first_line(error)}); use a local "
                           "path, s3://bucket/prefix or another scheme pyarrow.fs or fsspec knows") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 client configured from the standard AWS environment variables (see the module docstring)."""
    options: dict = {"connect_timeout": 5, "request_timeout": 60,
                     "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region or endpoint:
        options["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**options)


# ------------------------------------------------------------------------------------ errors
def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def has_credentials() -> bool:
    """Whether an explicit AWS credential source is configured (variables or ~/.aws files); an
    instance profile cannot be seen from here, so this only sharpens an error message."""
    return any(os.environ.get(name) for name in _CREDENTIAL_VARIABLES) or any(
        (Path.home() / ".aws" / name).is_file() for name in ("credentials", "config"))


def explain_error(location: Location, error: BaseException, action: str) -> StorageError:
    """A one-line StorageError saying what went wrong with ``location`` and what to check."""
    text = _first_line(error)
    where = location.uri
    if location.local:
        reason = getattr(error, "strerror", None) or text
        if action.startswith("write"):
            return StorageError(f"store directory {where!r} is not writable: {reason}")
        return StorageError(f"cannot {action} {where}: {reason}")
    if not has_credentials():
        return StorageError(f"cannot {action} {where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, a profile or an instance profile) [{text[:160]}]")
    if "ACCESS_DENIED" in text or "HTTP status 403" in text:
        return StorageError(f"cannot {action} {where}: access denied (check the AWS credentials and the "
                            f"bucket policy)")
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return StorageError(f"cannot {action} {where}: the S3 endpoint {endpoint} is unreachable [{text[:160]}]")
    return StorageError(f"cannot {action} {where}: {text}")


def check_bucket(location: Location) -> None:
    """For object storage: the bucket (first path component) must exist and be reachable."""
    if location.local:
        return
    bucket = location.root.split("/", 1)[0]
    try:
        info = location.fs.get_file_info(bucket)
    except OSError as error:
        raise explain_error(location, error, "reach") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"cannot use {location.uri}: the bucket {bucket!r} does not exist")


# ------------------------------------------------------------------------------------ reading
def exists(location: Location, path: str) -> bool:
    """Whether a file exists at ``path``."""
    return location.fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: Location, path: str) -> bytes | None:
    """The content of a file, or None when there is none."""
    try:
        with location.fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        if location.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise explain_error(location, error, "read") from None


def list_files(location: Location, directory: str, suffix: str = "") -> list[pafs.FileInfo]:
    """Complete files directly in ``directory`` ending with ``suffix`` (names starting with '.' or '_'
    are temporaries or metadata), sorted by name."""
    entries = location.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted((e for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(suffix)
                   and e.base_name[0] not in "._"), key=lambda e: e.base_name)


def list_directories(location: Location, directory: str) -> list[str]:
    """Names of the sub-directories (prefixes) of ``directory``, without hidden ones."""
    entries = location.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name[0] not in "._")


# ------------------------------------------------------------------------------------ writing
def write_bytes(location: Location, path: str, data: bytes | pa.Buffer, job: str = "w") -> None:
    """Commit ``data`` at ``path``: readers see the previous content or all of the new one, never part."""
    if location.local:
        _write_local(Path(path), data, job)
        return
    with location.fs.open_output_stream(path) as stream:  # one PUT (or a multipart upload completed at close)
        stream.write(data)


def _write_local(path: Path, data: bytes | pa.Buffer, job: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}-{job}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(memoryview(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: fsync the directory that holds the new name."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete(location: Location, path: str) -> None:
    """Remove a file if it is there."""
    try:
        location.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError:
        if location.fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise


def remove_temporaries(location: Location, keep_jobs: set[str]) -> int:
    """Delete the local temporaries of every job not in ``keep_jobs`` (the live ones): such a file
    belongs to a writer that is provably gone. Object storage has no temporaries."""
    if not location.local or not os.path.isdir(location.root):
        return 0
    removed = 0
    for directory, _, names in os.walk(location.root):
        for name in names:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                job = name[: -len(TMP_SUFFIX)].rsplit("-", 1)[-1]
                if job not in keep_jobs:
                    Path(directory, name).unlink(missing_ok=True)
                    removed += 1
    return removed


def host_name() -> str:
    """This machine's name, as recorded in job locks."""
    return socket.gethostname()
