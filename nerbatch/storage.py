"""Where inputs and outputs live: plain paths, or URIs of any fsspec filesystem.

`file://` and plain paths are the local disk; `s3://`, `gs://`, `abfs://`, `hdfs://`, ... need the
matching fsspec package (s3fs, gcsfs, adlfs; pyarrow for HDFS) and read their usual credentials;
`memory://` is fsspec's in-process filesystem (tests). pyarrow reads and writes Parquet through the
same filesystem object (natively for local paths).

Publishing is "write under a temporary name, then move". On a local disk and on HDFS the move is an
atomic rename. Object stores have no rename: the move is a server-side copy followed by deleting
the temporary, and the copy makes the destination object appear whole or not at all, so readers
still never see a partial file. Completion markers are small objects written after the data.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec

from nerbatch.errors import NerbatchError


class StorageError(NerbatchError):
    """A location that cannot be used: unknown scheme, missing filesystem package, no access."""


def _is_uri(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A path on a filesystem: a local path, or a path inside an fsspec filesystem."""

    fs: fsspec.AbstractFileSystem
    path: str
    # "scheme://host:port" where the filesystem's paths leave the host out (HDFS, Azure accounts)
    prefix: str | None = None

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    @property
    def uri(self) -> str:
        """What is recorded and printed: an absolute path for local files, else the full URI."""
        if self.local:
            return self.path
        return self.prefix + self.path if self.prefix else self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def at(self, path: str) -> Location:
        """Another path on the same filesystem."""
        return Location(self.fs, path, self.prefix)

    @property
    def parent(self) -> Location:
        return self.at(posixpath.dirname(self.path))

    def __truediv__(self, name: str) -> Location:
        return self.at(posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.uri

    def kind(self) -> str | None:
        """ "file", "directory", or None when nothing is there. Unlike `is_dir`/`exists` (which
        fsspec answers False on any error), a refused or failed request raises."""
        try:
            return self.fs.info(self.path)["type"]
        except FileNotFoundError:
            return None

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_inside(self, other: Location) -> bool:
        """Whether this location is `other` or below it (on the same filesystem)."""
        same_fs = type(self.fs) is type(other.fs) and self.local == other.local
        return same_fs and (self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/"))

    def relative_to(self, other: Location) -> str:
        return posixpath.relpath(self.path, other.path)

    def find(self, suffix: str = "") -> list[Location]:
        """Every file below this directory whose name ends with `suffix`, sorted."""
        return [self.at(p) for p in sorted(self.fs.find(self.path)) if p.endswith(suffix)]

    def children(self) -> list[Location]:
        if not self.is_dir():
            return []
        return [self.at(p) for p in sorted(self.fs.ls(self.path, detail=False)) if p != self.path]

    def refresh(self) -> None:
        """Forget cached listings below this path (object-store backends answer `exists` and `ls`
        from a cache filled by earlier listings; another process's new files would stay unseen)."""
        self.fs.invalidate_cache(self.path)

    def make_parent(self) -> None:
        """Create the parent directory (a no-op on object stores, which have no directories)."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)

    def read_text(self) -> str:
        with self.fs.open(self.path, "r", encoding="utf-8") as f:
            return f.read()

    def read_json(self):
        return json.loads(self.read_text())

    def write_json(self, data) -> None:
        """Write JSON so that readers see all of it or nothing (temporary file + move on a local disk;
        one object upload elsewhere)."""
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        if not self.local:
            self.fs.pipe_file(self.path, text.encode("utf-8"))
            return
        self.make_parent()
        temporary = self.parent / f".{self.name}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(temporary.path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary.path, self.path)

    def move_to(self, final: Location) -> None:
        """Publish a finished file under its final name (see the module docstring for atomicity)."""
        if self.local:
            _fsync(self.path)
        final.make_parent()
        self.fs.mv(self.path, final.path)

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path)

    def remove_tree(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def locate(spec: str | os.PathLike) -> Location:
    """The Location of a plain path, a `file://` URI or any fsspec URI; one-line errors for an
    unknown scheme or a filesystem package that is not installed."""
    spec = os.fspath(spec)
    if not _is_uri(spec):
        local = fsspec.filesystem("file")
        return Location(local, os.path.realpath(os.path.expanduser(spec.removeprefix("file://"))))
    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except Exception as exc:  # "Install s3fs to access S3", "Protocol not known", a refused connection, ...
        raise StorageError(f"{spec}: cannot open this location ({exc})") from exc
    parts = urlsplit(spec)
    # s3://bucket/key -> path "bucket/key" keeps the bucket; hdfs://namenode:8020/data -> "/data" drops the host
    keeps_host = not parts.netloc or not path.startswith("/") or path.lstrip("/").startswith(parts.netloc)
    return Location(fs, path, None if keeps_host else f"{parts.scheme}://{parts.netloc}")


def check_access(location: Location, spec: str) -> None:
    """List `location` once so that missing credentials or an unreachable store fail here, in one
    line, before any work (fsspec backends raise PermissionError, ClientError, OSError, ...)."""
    try:
        location.kind()
    except Exception as exc:
        raise one_line(spec, "use this location", exc) from exc


def one_line(spec: str, action: str, exc: Exception) -> StorageError:
    """A `StorageError` for a failed request of a filesystem backend (whatever it raised)."""
    return StorageError(f"{spec}: cannot {action} ({type(exc).__name__}: {exc})")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
