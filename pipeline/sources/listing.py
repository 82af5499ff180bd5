"""Image sources: folders, SA-1B tar shards and manifests, as streams of ``ImageRecord``.

A labeling run's inputs are URIs (local paths or any fsspec URI: ``s3://``, ``gs://``,
``file://``, ``memory://``, glob patterns allowed). ``list_shards`` turns them into ``Shard``
objects, the unit of work and of output (one Parquet file per shard); ``iter_shard`` streams one
shard's records. Both are plain functions on picklable values, so they run on the driver or in
Ray tasks alike.

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

Nothing is lost silently: every image a source contains yields exactly one record, and a record
whose ``error`` is set stands for an image (or an archive problem) that could not be read, for
the labeler to write as an ``error`` row. In tars, a member whose name escapes the archive
(``../x.jpg``, ``/abs/x.jpg``) or is not a regular file is never read; a truncated archive yields
the records read so far plus one error record naming the truncation; an image without json gets
``sam_json=None``; a json without image gives an error record.

Shard names are deterministic: ``<stem>-<h>`` for a tar, ``<stem>-<h>-<index>`` for a folder or
manifest group, where ``<h>`` is the first 8 hex digits of the sha256 of the source URI as given
(so rerunning with the same ``--input`` maps each shard to the same output file).
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MANIFEST_SUFFIXES = (".parquet", ".csv")
DEFAULT_SHARD_SIZE = 1000  # images per output file for folders and manifests
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # files/members larger than this become error records
_GLOB_CHARS = "*?["
_TAR_BUFSIZE = 1 << 20  # bytes per read from the tar stream (the default is 10 KiB)
SKIP_NOT_IMAGE = "not an image"  # skip reason: a folder file that is no image, tar or manifest
MAX_SKIP_EXAMPLES = 5  # paths kept per skip reason


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image of a source, undecoded (decoding is ``pipeline.sources.decode``'s job)."""

    image_id: str  # stable id, unique within its shard (see the module docstring)
    uri: str  # where it came from; tar members as "tar://<tar uri>#<member name>"
    shard: str  # name of the shard (= output file stem) it belongs to
    data: bytes | None = None  # the encoded image file; None when error is set
    sam_json: bytes | None = None  # its SA-1B mask json, when the source has one
    error: str | None = None  # why the image cannot be used; None for a readable record

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (e.g. a Ray Data row); ``ImageRecord(**record.to_dict())`` round-trips."""
        return asdict(self)


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


# ---------------------------------------------------------------------------------------------
# Reading


def iter_source(
    uri: str, *, shard_size: int = DEFAULT_SHARD_SIZE, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[ImageRecord]:
    """All records of one input URI, shard after shard."""
    for shard in list_shards([uri], shard_size=shard_size):
        yield from iter_shard(shard, max_bytes=max_bytes)


def iter_shard(shard: Shard, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[ImageRecord]:
    """Stream the records of one shard (see the module docstring for the error cases)."""
    if shard.kind == "tar":
        yield from _iter_tar(shard, max_bytes)
        return
    for image_id, uri in shard.items:
        if not uri:
            yield ImageRecord(image_id=image_id, uri=uri, shard=shard.name, error="empty uri")
            continue
        try:
            data = _read_bytes(uri, max_bytes)
        except Exception as e:
            yield ImageRecord(
                image_id=image_id,
                uri=uri,
                shard=shard.name,
                error=f"cannot read {uri}: {type(e).__name__}: {e}",
            )
            continue
        yield ImageRecord(image_id=image_id, uri=uri, shard=shard.name, data=data)


def read_uri(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes behind a record's URI, including ``tar://<tar uri>#<member>`` ones.

    A tar member is found by scanning the archive as a stream (fine for reviewing a few images,
    not for bulk reading: use ``iter_shard`` for that).
    """
    if uri.startswith("tar://") and "#" in uri:
        tar_uri, member_name = uri[len("tar://") :].rsplit("#", 1)
        with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.name == member_name and member.isfile():
                    if _safe_member_key(member.name) is None:
                        raise ValueError(f"member name escapes the archive: {member_name!r}")
                    return _read_member(tar, member, max_bytes)
        raise FileNotFoundError(f"no member {member_name!r} in {tar_uri}")
    return _read_bytes(uri, max_bytes)


def _read_bytes(uri: str, max_bytes: int) -> bytes:
    with fsspec.open(uri, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"file larger than max_bytes={max_bytes}")
    return data


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes:
    if member.size > max_bytes:
        raise ValueError(f"member of {member.size} bytes exceeds max_bytes={max_bytes}")
    f = tar.extractfile(member)
    if f is None:
        raise ValueError("not a regular file")
    data = f.read()
    if len(data) != member.size:
        raise EOFError(f"member cut off after {len(data)} of {member.size} bytes")
    return data


@dataclass
class _Pair:
    """The two halves of a tar record as they arrive: (member name, bytes or None, error)."""

    image: tuple[str, bytes | None, str | None] | None = None
    json: tuple[str, bytes | None, str | None] | None = None


def _iter_tar(shard: Shard, max_bytes: int) -> Iterator[ImageRecord]:
    """Stream a tar shard, pairing ``<key>.<image ext>`` with ``<key>.json``.

    A pair is yielded as soon as both halves are read; SA-1B stores them next to each other, so
    only a pair's first half waits in memory (a tar that stores all images before all jsons keeps
    the images in memory until their jsons arrive). Halves still waiting at the end of the
    archive are yielded then: images without json, and orphan jsons as error records.
    """

    def error_record(image_id: str, uri: str, error: str) -> ImageRecord:
        return ImageRecord(image_id=image_id, uri=uri, shard=shard.name, error=error)

    pending: dict[str, _Pair] = {}  # key -> halves read so far, in arrival order
    finished: set[str] = set()  # ids already yielded
    truncation: str | None = None  # set when the archive stops early
    try:
        raw = fsspec.open(shard.uri, "rb").open()
    except Exception as e:
        yield error_record(
            f"{shard.name}#unreadable",
            shard.uri,
            f"cannot open tar {shard.uri}: {type(e).__name__}: {e}",
        )
        return
    try:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*", bufsize=_TAR_BUFSIZE)
        except Exception as e:
            yield error_record(
                f"{shard.name}#unreadable",
                shard.uri,
                f"not a readable tar archive: {type(e).__name__}: {e}",
            )
            return
        index = 0
        while True:
            try:
                member = tar.next()
            except Exception as e:  # ReadError, EOFError, zlib.error, OSError ...
                truncation = (
                    f"truncated or corrupt tar after {index} members: {type(e).__name__}: {e}"
                )
                break
            if member is None:
                # A complete archive ends with a 512-byte zero block; a shorter tail means the
                # stream stopped early (inside a header, or right after a member's data).
                if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
                    truncation = f"truncated tar: no end-of-archive marker after {index} members"
                break
            index += 1
            kind = _member_kind(member.name)
            if kind is None or member.isdir():
                continue  # directories, READMEs and other non-image members
            uri = f"tar://{shard.uri}#{member.name}"
            key = _safe_member_key(member.name)
            if key is None:
                image_id = member.name if member.name not in finished else f"{member.name}#{index}"
                finished.add(image_id)
                yield error_record(
                    image_id, uri, f"unsafe tar member name escapes the archive: {member.name!r}"
                )
                continue
            pair = pending.setdefault(key, _Pair()) if key not in finished else None
            if pair is None or getattr(pair, kind) is not None:
                yield error_record(
                    f"{key}#{index}", uri, f"duplicate tar member for {key!r}: {member.name!r}"
                )
                continue
            data: bytes | None = None
            error: str | None = None
            if not member.isfile():
                error = f"tar member {member.name!r} is a link or device, not a regular file"
            else:
                try:
                    data = _read_member(tar, member, max_bytes)
                except ValueError as e:  # too large: skipped, the stream goes on
                    error = f"tar member {member.name!r}: {e}"
                except Exception as e:  # the stream ended inside this member
                    error = (
                        f"truncated tar: member {member.name!r} cut off: {type(e).__name__}: {e}"
                    )
                    truncation = error
            setattr(pair, kind, (member.name, data, error))
            if truncation is not None:
                truncation = None  # reported by this member's record
                break
            if pair.image is not None and pair.json is not None:
                del pending[key]
                finished.add(key)
                yield _pair_record(shard, key, pair)
    finally:
        raw.close()
    for key, pair in pending.items():
        yield _pair_record(shard, key, pair)
    if truncation is not None:
        yield error_record(f"{shard.name}#truncated", shard.uri, truncation)


def _pair_record(shard: Shard, key: str, pair: _Pair) -> ImageRecord:
    if pair.image is None:
        assert pair.json is not None
        name, _, error = pair.json
        reason = error or f"mask json {name!r} has no image in the archive"
        return ImageRecord(
            image_id=key, uri=f"tar://{shard.uri}#{name}", shard=shard.name, error=reason
        )
    name, data, error = pair.image
    uri = f"tar://{shard.uri}#{name}"
    if error is None and pair.json is not None and pair.json[2] is not None:
        error = f"its mask json: {pair.json[2]}"
    if error is not None:
        return ImageRecord(image_id=key, uri=uri, shard=shard.name, error=error)
    sam_json = pair.json[1] if pair.json is not None else None
    return ImageRecord(image_id=key, uri=uri, shard=shard.name, data=data, sam_json=sam_json)


def _member_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(".json"):
        return "json"
    return None


def _safe_member_key(name: str) -> str | None:
    """The member's path without extension, or None when the name escapes the archive."""
    if not name or "\x00" in name or "\\" in name:
        return None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):  # absolute, or "C:..."
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or norm.startswith("/") or norm == ".":
        return None
    return posixpath.splitext(norm)[0]


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
