"""CacheStore: where a cache lives (a local directory or an object-store URL) and the crash-safe writes to it.

Every write of the cache lifecycle goes through here, so each location keeps the same promise (FORMAT.md "Object
storage"): a file appears whole or not at all. Locally that is a temporary file, fsync and rename. On object
storage (s3://, gs://, ...) there is no rename, so an object is only ever created from bytes that are already
complete: a shard is staged in a local file and uploaded in one go, JSON is serialized before its upload starts.
A single PUT is atomic, and so is a multipart upload, which stays invisible until it is completed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from logitcache.storage.layout import CacheLayout
from logitcache.storage.schema import CacheFormatError

__all__ = ["CacheStore", "StorageLocationError", "atomic_write_json", "filesystem", "is_url"]

log = logging.getLogger(__name__)

# Read and upload in pieces of this size: a shard is never held in memory whole.
_CHUNK_BYTES = 8 << 20
# Object stores a cache may be written to: S3 and S3-compatible servers (MinIO, Ceph, moto in the tests).
_WRITABLE_SCHEMES = ("s3",)


class StorageLocationError(CacheFormatError):
    """A cache location that cannot be used (credentials in the URL, a missing bucket); the message names the fix."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` locations (object storage), False for local paths."""
    return "://" in str(path)


def _s3_filesystem() -> pafs.S3FileSystem | None:
    """An S3 filesystem for the endpoint in AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or None when neither is set.

    pyarrow 26's `S3FileSystem()` ignores AWS_ENDPOINT_URL (only `FileSystem.from_uri` reads it; checked against a
    moto server), so the endpoint is passed from the standard variables here, the service-specific one first as in
    the AWS SDKs. Credentials are left to the AWS default chain (environment, profiles, instance roles): they are
    never passed, stored or logged by logitcache.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(endpoint_override=endpoint, **({"region": region} if region else {}))


def filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the root inside it: local paths and URLs (s3://, gs://, file://) alike."""
    s = str(path)
    if not is_url(s):
        return pafs.LocalFileSystem(), str(Path(s).absolute())
    parts = urlsplit(s)
    if parts.username or parts.password:
        raise StorageLocationError(
            f"{parts.scheme}://...@{parts.hostname}{parts.path}: credentials in the URL would be recorded in the "
            "cache's config and in logs; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    if parts.scheme == "s3" and (fs := _s3_filesystem()) is not None:
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    # no endpoint override: from_uri also looks up the bucket's region
    fs, root = pafs.FileSystem.from_uri(s)
    return fs, root.rstrip("/")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON to a temporary file, fsyncs it and renames it over `path`: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Makes a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pieces(f: Any) -> Iterator[bytes]:
    """A binary file's bytes in pieces of _CHUNK_BYTES."""
    while chunk := f.read(_CHUNK_BYTES):
        yield chunk


class CacheStore:
    """One cache's location and the operations its lifecycle needs, for a local directory or an object store.

    `layout` names every file (storage/layout.py); for a URL its paths are the filesystem's own (`bucket/prefix/...`)
    and must be used through this store, never through `Path` methods. Local caches take exactly the code paths they
    always did (pathlib, fsync, rename).
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.location = str(location)
        if self.location.startswith("file://"):
            # a local directory: the rename path, not pyarrow's stream, which shows a file while it is written
            self.location = urlsplit(self.location).path
        self.is_local = not is_url(self.location)
        if self.is_local:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.layout = CacheLayout(Path(self.location))
        else:
            self.fs, root = filesystem(self.location)
            self.layout = CacheLayout(Path(root))

    @property
    def root(self) -> Path:
        return self.layout.root

    def name(self, path: Path | None = None) -> str:
        """How messages name `path` (default: the cache): the local path, or its URL."""
        p = self.root if path is None else path
        return str(p) if self.is_local else f"{self.location.split('://', 1)[0]}://{p}"

    def _type(self, path: Path) -> pafs.FileType:
        return self.fs.get_file_info(str(path)).type

    def exists(self, path: Path) -> bool:
        return path.exists() if self.is_local else self._type(path) != pafs.FileType.NotFound

    def is_file(self, path: Path) -> bool:
        return path.is_file() if self.is_local else self._type(path) == pafs.FileType.File

    def names(self, folder: Path) -> list[str]:
        """The sorted names directly inside `folder` (none when it does not exist)."""
        if self.is_local:
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        infos = self.fs.get_file_info(pafs.FileSelector(str(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def size(self, path: Path) -> int:
        return path.stat().st_size if self.is_local else int(self.fs.get_file_info(str(path)).size or 0)

    def sha256(self, path: Path) -> str:
        """Hex sha256 of a file's bytes, read in pieces."""
        h = hashlib.sha256()
        with self.open_input_file(path) as f:
            for chunk in _pieces(f):
                h.update(chunk)
        return h.hexdigest()

    def read_text(self, path: Path) -> str:
        if self.is_local:
            return path.read_text()
        with self.fs.open_input_stream(str(path)) as f:
            return bytes(f.read()).decode()

    def open_input_file(self, path: Path) -> Any:
        """A seekable binary file (for pyarrow.parquet) of `path`."""
        return open(path, "rb") if self.is_local else self.fs.open_input_file(str(path))

    def makedirs(self, folder: Path) -> None:
        """Creates `folder` locally; on object storage folders are implied by keys, so only the bucket is checked."""
        if self.is_local:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            self.check_bucket()

    def check_bucket(self) -> None:
        """Raises StorageLocationError, naming the fix, when the bucket is missing or cannot be reached, or when the
        store is not one whose uploads are known to be all-or-nothing (s3://, tested against an S3 server)."""
        scheme = self.location.split("://", 1)[0]
        if scheme not in _WRITABLE_SCHEMES:
            raise StorageLocationError(
                f"{self.name()}: logitcache writes caches to local directories and s3:// only ({scheme}:// uploads are "
                "not tested to be all-or-nothing); write it locally, then copy it (it can be read from there)"
            )
        bucket = self.root.parts[0]
        try:
            missing = self._type(Path(bucket)) == pafs.FileType.NotFound
        except OSError as e:  # refused credentials, an unreachable endpoint: the SDK's message names which
            raise StorageLocationError(
                f"{self.name()}: cannot reach the bucket {bucket!r} ({e}); check AWS_ENDPOINT_URL, the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and AWS_DEFAULT_REGION"
            ) from None
        if missing:
            raise StorageLocationError(
                f"{self.name()}: the bucket {bucket!r} does not exist (or these credentials cannot see it); create it "
                "first (e.g. `aws s3 mb s3://BUCKET`) or check AWS_ENDPOINT_URL and the credentials"
            )

    def delete(self, path: Path) -> None:
        if self.is_local:
            path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(str(path))

    def write_json(self, path: Path, obj: Any) -> None:
        """Writes `obj` as JSON so that readers see the old file or the whole new one, never a part."""
        if self.is_local:
            atomic_write_json(path, obj)
            return
        data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
        self._upload(path, [data], len(data))

    def publish(self, staged: Path, path: Path) -> None:
        """Moves the complete local file `staged` to `path` in one step (local: fsync + rename; remote: one upload).

        `staged` is gone afterwards. A process killed meanwhile leaves `staged` (see `staging_dir`) and no `path`.
        """
        if self.is_local:
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(staged, path)
            fsync_dir(path.parent)
            return
        with open(staged, "rb") as f:
            self._upload(path, _pieces(f), staged.stat().st_size)
        staged.unlink()

    def _upload(self, path: Path, chunks: Any, size: int) -> None:
        """Creates the object `path` from `chunks` (bytes, `size` in all), whole or not at all.

        A killed process never completes its upload (a single PUT or an uncompleted multipart upload: invisible).
        Closing a pyarrow S3 stream, though, publishes what was written so far, and a stream dropped on an
        exception is closed by its destructor (both checked against a moto server): so on an error the stream is
        closed here first, then the object is deleted, and a size mismatch counts as an error.
        """
        out = self.fs.open_output_stream(str(path))
        try:
            for chunk in chunks:
                out.write(chunk)
            out.close()
            got = self.size(path)
            if got != size:
                raise OSError(f"{self.name(path)}: uploaded {got} bytes of {size}")
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            with contextlib.suppress(Exception):
                self.fs.delete_file(str(path))
            raise

    def staging_dir(self) -> Path:
        """Where shards are written before they are published: the shards folder itself for a local cache (a
        `.tmp` name, then a rename); for a URL a local folder under $TMPDIR, one per cache, so a resumed capture
        finds and deletes what a killed one left."""
        if self.is_local:
            return self.layout.shards_dir
        # the endpoint too: the same bucket name on two servers is two caches (hashed: nothing of it is written)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        key = hashlib.sha256(f"{endpoint}\0{self.name()}".encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / "logitcache-staging" / key
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def put_dir(self, local: Path, folder: Path) -> None:
        """Uploads every file under the local directory `local` to `folder`, each object whole (its own upload)."""
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            dest = folder / file.relative_to(local)
            if self.is_local:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, dest)
            else:
                with open(file, "rb") as f:
                    self._upload(dest, _pieces(f), file.stat().st_size)

    def local_copy(self, folder: Path, version: str = "") -> Path | None:
        """`folder` as a local directory: itself for a local cache; for a URL a copy under $TMPDIR, downloaded once
        per cache and `version` (e.g. a fingerprint: a recaptured cache gets a new copy), into a temporary folder
        renamed into place; None when there is no such folder."""
        if self.is_local:
            return folder if folder.is_dir() else None
        tag = hashlib.sha256(version.encode()).hexdigest()[:12]
        dest = self.staging_dir() / "copies" / f"{folder.name}-{tag}"
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=dest.parent))
        try:
            if not self.fetch_dir(folder, tmp):
                return None
            with contextlib.suppress(OSError):  # another process renamed its copy first: same bytes
                os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def fetch_dir(self, folder: Path, local: Path) -> bool:
        """Downloads every file under `folder` into the local directory `local`; False when `folder` is empty."""
        if self.is_local:
            raise ValueError("fetch_dir is for caches on object storage; a local folder is read in place")
        infos = self.fs.get_file_info(pafs.FileSelector(str(folder), recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File]
        for info in files:
            dest = local / Path(info.path).relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                while chunk := src.read(_CHUNK_BYTES):
                    out.write(chunk)
        return bool(files)

    @contextlib.contextmanager
    def append_text(self, path: Path) -> Iterator[IO[str]]:
        """A text file to append lines to (a log). Object storage cannot append: the lines go to a local copy
        (seeded from the object the first time), which is uploaded whole when the block ends, error or not."""
        if self.is_local:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                yield f
            return
        local = self.staging_dir() / path.name
        if not local.exists() and self.exists(path):
            local.write_text(self.read_text(path), encoding="utf-8")
        try:
            with local.open("a", encoding="utf-8") as f:
                yield f
        finally:
            self.publish_copy(local, path)

    def publish_copy(self, local: Path, path: Path) -> None:
        """Uploads the local file `local` to `path` whole, keeping `local` (remote stores only)."""
        with open(local, "rb") as f:
            self._upload(path, _pieces(f), local.stat().st_size)
