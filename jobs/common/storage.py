"""Where a batch job's files live: a local path or any URI pyarrow's filesystems understand (``s3://``,
``gs://``, ``hdfs://``, ``file://``).

Everything the jobs read and write goes through `location(uri)` -> (pyarrow filesystem, path), in the driver
and in Ray's workers alike, so the same code serves a laptop folder and a bucket. Credentials and endpoints come
from the environment the filesystem reads (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible server), or from the URI's query
(``s3://bucket/path?endpoint_override=host:9000&scheme=http``).

A file is written atomically (`write_atomic`): readers see the whole file or none of it. On object stores a
single PUT is atomic by itself; on filesystems the file is written under a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"  # files being written (never read; removed by `remove_temporary`)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def location(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local path (relative: from the working directory or the repository root,
    as `resolve_path` says) or a URI."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(str(uri))
    from jobs.common.config import resolve_path

    return pafs.LocalFileSystem(), str(resolve_path(str(uri)))


def join(uri: str, *names: str) -> str:
    """`uri` / names, for local paths and URIs alike (a URI's query, if any, stays at the end)."""
    base, _, query = str(uri).partition("?")
    out = "/".join([base.rstrip("/")] + [n.strip("/") for n in names])
    return out + (f"?{query}" if query else "")


def display(uri: str) -> str:
    """`uri` as people read it (local paths absolute, URIs without their query)."""
    return str(uri).partition("?")[0] if is_uri(uri) else location(uri)[1]


def _object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in ("s3", "gcs", "abfs")


def exists(uri: str) -> bool:
    fs, path = location(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = location(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def make_dir(uri: str) -> None:
    fs, path = location(uri)
    fs.create_dir(path, recursive=True)


def list_names(uri: str) -> list[str]:
    """The names of the files directly in folder `uri` (none if it does not exist): one listing call."""
    fs, path = location(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def list_files(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """`uri` itself if it is a file, else every file under folder `uri` whose name ends with one of `suffixes`
    (sorted), as URIs of the same kind as `uri`; none if there is nothing there."""
    fs, path = location(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [str(uri) if is_uri(uri) else path]
    if info.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rel = sorted(os.path.relpath(i.path, path) for i in found
                 if i.type == pafs.FileType.File and i.base_name.endswith(suffixes)
                 and not i.base_name.startswith((".", "_")))
    return [join(uri, r) if is_uri(uri) else os.path.join(path, r) for r in rel]


def read_bytes(uri: str) -> bytes:
    fs, path = location(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@contextlib.contextmanager
def atomic_path(uri: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """(filesystem, temporary path) to stream the file `uri` to: it is renamed to `uri` when the block ends
    without an error (readers see the whole file), and removed otherwise. (An object store's output stream
    commits what was written even when the writer fails, so objects too go through a temporary key.)"""
    fs, path = location(uri)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}" if parent else f"{TMP_PREFIX}{name}"
    try:
        yield fs, tmp
        fs.move(tmp, path)  # a rename on filesystems; a server-side copy + delete on object stores
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_atomic(uri: str, data: bytes) -> None:
    """Write the file `uri`: readers see it whole or not at all (objects: one PUT; files: a rename)."""
    fs, path = location(uri)
    if _object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    with atomic_path(uri) as (fs, tmp), fs.open_output_stream(tmp) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_atomic(uri, text.encode())


def delete(uri: str, names: list[str]) -> None:
    """Delete the files `names` of folder `uri` (missing ones are fine)."""
    fs, path = location(uri)
    for n in names:
        try:
            fs.delete_file(f"{path}/{n}")
        except (FileNotFoundError, OSError):
            pass


def remove_temporary(uri: str) -> list[str]:
    """Remove what a killed writer left under a temporary name in folder `uri`; returns the names."""
    left = [n for n in list_names(uri) if n.startswith(TMP_PREFIX)]
    delete(uri, left)
    return left


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[str]:
    """A local folder for a library that writes files itself (the evaluation report): `uri` itself if it is local,
    else a temporary folder whose files are uploaded under `uri` when the block ends without an error."""
    if not is_uri(uri):
        yield location(uri)[1]
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="diffpo-") as tmp:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), tmp)
                with open(os.path.join(root, f), "rb") as fh:
                    write_atomic(join(uri, rel.replace(os.sep, "/")), fh.read())
