"""The labeling output's file system: a local folder or an object-store URI, through ``pyarrow.fs``.

``resolve("labels/")`` and ``resolve("s3://bucket/labels")`` (also ``gs://``, ``hdfs://``,
``file://``) give a ``pyarrow.fs.FileSystem`` and the base path on it; the helpers below take
that pair. Whole-file writes are atomic: on file systems that rename (local, HDFS) a file is
written under a temporary name beside its final one and then moved; object stores make an
object visible only once its upload is complete, so there the final key is written directly.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# File systems whose move is a rename (atomic); on the others a written object appears whole.
_RENAMING = ("local", "hdfs")


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a file system by scheme (``s3://...``) rather than a path."""
    return "://" in os.fspath(location)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(file system, base path) of a local path or a URI; the path has no trailing slash."""
    location = os.fspath(location)
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/") or path
    return pafs.LocalFileSystem(), os.path.abspath(location)


def uri_join(location: str | os.PathLike, *names: str) -> str:
    """``location/name/...`` for a path or a URI (before a URI's ``?query``)."""
    location = os.fspath(location)
    head, sep, query = location.partition("?")
    return join(head, *names) + sep + query


def join(base: str, *names: str) -> str:
    """``base/name/...`` with "/" separators (what pyarrow.fs paths use everywhere)."""
    return "/".join([base.rstrip("/"), *names])


def renames(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` moves files by an atomic rename."""
    return fs.type_name in _RENAMING


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def list_dir(fs: pafs.FileSystem, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries under ``path`` (none when it does not exist), sorted by path."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted(infos, key=lambda i: i.path)


def remove_dir(fs: pafs.FileSystem, path: str) -> bool:
    """Delete ``path`` and everything under it; False when there was nothing."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    try:
        fs.delete_dir(path)
    except FileNotFoundError:  # someone else removed it first
        return False
    return True


def remove_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def _write_atomic(fs: pafs.FileSystem, path: str, write) -> None:
    parent, _, name = path.rpartition("/")
    if not renames(fs):  # object stores: no folders to make, no rename
        write(path)
        return
    fs.create_dir(parent, recursive=True)
    tmp = join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fs.move(tmp, path)
    finally:
        if is_file(fs, tmp):
            remove_file(fs, tmp)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write ``table`` (with its schema metadata) to ``path`` atomically, zstd-compressed."""
    _write_atomic(fs, path, lambda p: pq.write_table(table, p, filesystem=fs, compression="zstd"))


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(p: str) -> None:
        with fs.open_output_stream(p) as f:
            f.write(text.encode("utf-8"))

    _write_atomic(fs, path, write)


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")
