"""Image sources listed as shards: folders, SA-1B tar shards and manifests.

A labeling run's inputs are URIs (local paths or any fsspec URI: ``s3://``, ``gs://``,
``file://``, ``memory://``, glob patterns allowed). ``list_shards`` turns them into ``Shard``
objects, the unit of work and of output (one Parquet file per shard); ``iter_shard``
(``pipeline.sources.reading``) streams one shard's records. Both are plain functions on picklable
values, so they run on the driver or in Ray tasks alike.

- A folder (searched recursively) gives its images (``IMAGE_EXTENSIONS``; a GIF is labeled by
  its first frame) in sorted order, grouped into shards of ``shard_size`` images; tar files found
  in it become tar shards. Image id: the path relative to the folder (``"sub/a.jpg"``). Every
  other file is skipped and counted by reason (``Listing.skipped``, e.g. ``{"not an image": 3}``),
  so the run summary can say what was left out.
- An SA-1B tar (``.tar``, also ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``) is one shard, read
  as a stream (``tarfile`` mode ``"r|*"``) member by member and never extracted to disk; each
  ``<key>.jpg`` is paired with its ``<key>.json`` (its class-agnostic masks). Image id: the
  member path without extension (``"sa_223750"``, which is SA-1B's ``file_name`` stem; the json's
  numeric ``image_id`` is not parsed here, so a corrupt json cannot change the id).
- A manifest (``.parquet`` or ``.csv``) lists image URIs in a ``uri`` column, with an optional
  ``image_id`` column (default id: the first 16 hex digits of the URI's sha256); relative local
  paths are taken relative to the manifest's folder. Rows are grouped into shards of
  ``shard_size``.

Shard names are deterministic: ``<stem>-<h>`` for a tar, ``<stem>-<h>-<index>`` for a folder or
manifest group, where ``<h>`` is the first 8 hex digits of the sha256 of the source URI as given
(so rerunning with the same ``--input`` maps each shard to the same output file).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MANIFEST_SUFFIXES = (".parquet", ".csv")
DEFAULT_SHARD_SIZE = 1000  # images per output file for folders and manifests
_GLOB_CHARS = "*?["
SKIP_NOT_IMAGE = "not an image"  # skip reason: a folder file that is no image, tar or manifest
MAX_SKIP_EXAMPLES = 5  # paths kept per skip reason


@dataclass(frozen=True, kw_only=True)
class Shard:
    """A unit of work: one tar file, or a fixed-size group of folder images / manifest rows."""

    name: str  # output file stem, deterministic (see the module docstring)
    kind: str  # "tar" | "folder" | "manifest"
    uri: str  # the tar file; the folder root or manifest file for the other kinds
    items: tuple[tuple[str, str], ...] = ()  # (image_id, image uri) pairs; empty for tars

    @property
    def expected(self) -> int | None:
        """Number of records the shard yields, when known before reading it (not for tars)."""
        return None if self.kind == "tar" else len(self.items)

    @property
    def fingerprint(self) -> str:
        """sha256 of the shard's image ids ("" for tars): changes when a group's content does."""
        if self.kind == "tar":
            return ""
        return hashlib.sha256("\n".join(i for i, _ in self.items).encode("utf-8")).hexdigest()


@dataclass
class Listing:
    """The shards of a run's inputs, and the files of input folders that were left out."""

    shards: list[Shard]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of files
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few paths

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append(path)


# ---------------------------------------------------------------------------------------------
# Listing


def list_shards(uris: str | Iterable[str], *, shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """The shards of ``list_inputs`` (without the skipped-file counts)."""
    return list_inputs(uris, shard_size=shard_size).shards


def list_inputs(uris: str | Iterable[str], *, shard_size: int = DEFAULT_SHARD_SIZE) -> Listing:
    """Expand input URIs into shards, in a stable order, counting the folder files left out.

    Args:
        uris: folders, tar files, manifests, single image files or glob patterns (local paths or
            fsspec URIs).
        shard_size: images per shard for folders and manifests.
    Raises:
        FileNotFoundError: an input (or every match of a pattern) does not exist.
        ValueError: two inputs produce the same shard name (the same input given twice), or an
            input is a file of an unsupported type, or a manifest lacks a ``uri`` column.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    listing = Listing(shards=[])
    for uri in [uris] if isinstance(uris, str) else list(uris):
        listing.shards.extend(_list_one(uri, shard_size, listing))
    dupes = sorted(n for n, k in Counter(s.name for s in listing.shards).items() if k > 1)
    if dupes:
        raise ValueError(f"inputs give duplicate shards {dupes[:5]} (an input listed twice?)")
    return listing


def check_input(uri: str) -> None:
    """Cheap check of one input URI before a run (nothing is listed or read).

    Raises:
        FileNotFoundError: the path (or every match of a pattern) does not exist.
        ValueError: it is a file of an unsupported type.
    """
    fs, path = url_to_fs(uri.rstrip("/") or uri)
    if any(c in path for c in _GLOB_CHARS):
        if not fs.glob(path):
            raise FileNotFoundError(f"no file matches {uri}")
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {uri}")
    if not fs.isdir(path) and not _has_suffix(
        path, TAR_SUFFIXES + MANIFEST_SUFFIXES + IMAGE_EXTENSIONS
    ):
        raise ValueError(_unsupported(uri))


def _unsupported(given: str) -> str:
    return (
        f"unsupported input {given}: expected a folder, a tar file ({', '.join(TAR_SUFFIXES)}), "
        f"a manifest ({', '.join(MANIFEST_SUFFIXES)}) or an image ({', '.join(IMAGE_EXTENSIONS)})"
    )


def _list_one(uri: str, shard_size: int, listing: Listing) -> list[Shard]:
    uri = uri.rstrip("/") or uri
    fs, path = url_to_fs(uri)
    if any(c in path for c in _GLOB_CHARS):
        # Map matches back onto the URI as given: root = the part before the first magic char.
        first_magic = min(i for i in (uri.find(c) for c in _GLOB_CHARS) if i >= 0)
        cut = uri.rfind("/", 0, first_magic)
        given_root = uri[:cut] if cut > 0 else ""
        root_path = url_to_fs(given_root)[1] if given_root else ""
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"no file matches {uri}")
        shards: list[Shard] = []
        for match in matches:
            given = f"{given_root}/{posixpath.relpath(match, root_path)}" if given_root else match
            shards.extend(_list_path(fs, match, given, shard_size, listing))
        return shards
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {uri}")
    return _list_path(fs, path, uri, shard_size, listing)


def _list_path(fs: Any, path: str, given: str, shard_size: int, listing: Listing) -> list[Shard]:
    """Shards of one existing path (``given`` = its URI in the user's spelling)."""
    if fs.isdir(path):
        files = sorted(fs.find(path))
        tars: list[Shard] = []
        images: list[tuple[str, str]] = []
        for found in files:
            rel = posixpath.relpath(found, path)
            if _has_suffix(found, TAR_SUFFIXES):
                tars.append(_tar_shard(f"{given}/{rel}", _full_uri(fs, found)))
            elif _has_suffix(found, IMAGE_EXTENSIONS):
                images.append((rel, _full_uri(fs, found)))
            else:
                listing.skip(SKIP_NOT_IMAGE, f"{given}/{rel}")
        stem = posixpath.basename(path.rstrip("/")) or "root"
        return tars + _groups("folder", stem, given, _full_uri(fs, path), images, shard_size)
    if _has_suffix(path, TAR_SUFFIXES):
        return [_tar_shard(given, _full_uri(fs, path))]
    if _has_suffix(path, MANIFEST_SUFFIXES):
        items = _read_manifest(fs, path)
        stem = _stem(posixpath.basename(path), MANIFEST_SUFFIXES)
        return _groups("manifest", stem, given, _full_uri(fs, path), items, shard_size)
    if _has_suffix(path, IMAGE_EXTENSIONS):
        name = posixpath.basename(path)
        return _groups(
            "folder",
            _stem(name, IMAGE_EXTENSIONS),
            given,
            _full_uri(fs, path),
            [(name, _full_uri(fs, path))],
            shard_size,
        )
    raise ValueError(_unsupported(given))


def _tar_shard(given: str, full: str) -> Shard:
    stem = _stem(posixpath.basename(given), TAR_SUFFIXES)
    return Shard(name=f"{_safe(stem)}-{_short_hash(given)}", kind="tar", uri=full)


def _groups(
    kind: str, stem: str, given: str, full: str, items: list[tuple[str, str]], shard_size: int
) -> list[Shard]:
    prefix = f"{_safe(stem)}-{_short_hash(given)}"
    return [
        Shard(
            name=f"{prefix}-{i // shard_size:05d}",
            kind=kind,
            uri=full,
            items=tuple(items[i : i + shard_size]),
        )
        for i in range(0, len(items), shard_size)
    ]


def _read_manifest(fs: Any, path: str) -> list[tuple[str, str]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if path.lower().endswith(".parquet") else pacsv.read_csv(f)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {path} has no 'uri' column (columns: {table.column_names})")
    uris = table.column("uri").to_pylist()
    ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else None
    base = posixpath.dirname(path)
    items = []
    for row, uri in enumerate(uris):
        uri = "" if uri is None else str(uri).strip()
        if uri and "://" not in uri and not uri.startswith("/"):
            uri = _full_uri(fs, posixpath.join(base, uri))  # relative to the manifest's folder
        image_id = ids[row] if ids is not None else None
        if image_id is None or str(image_id) == "":
            image_id = _short_hash(uri, 16) if uri else f"row-{row}"
        items.append((str(image_id), uri))
    return items


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    return path.lower().endswith(suffixes)


def _stem(name: str, suffixes: tuple[str, ...]) -> str:
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(stem: str) -> str:
    """A file-name-safe version of ``stem`` (letters, digits, ``._-``)."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)
    return cleaned.strip(".") or "shard"


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _full_uri(fs: Any, path: str) -> str:
    """A URI usable by ``fsspec.open`` anywhere: plain absolute paths for the local file system."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)
