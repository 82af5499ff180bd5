"""Image sources read as streams of ``ImageRecord``: the records of one shard (``iter_shard``;
the shards are ``pipeline.sources.listing``'s), and the bytes behind any record's URI
(``read_uri``). Plain functions on picklable values, so they run on the driver or in Ray tasks
alike.

Folder and manifest shards read their images one by one through fsspec. An SA-1B tar is read as a
stream (``tarfile`` mode ``"r|*"``) member by member and never extracted to disk; each
``<key>.jpg`` is paired with its ``<key>.json`` (its class-agnostic masks).

Nothing is lost silently: every image a source contains yields exactly one record, and a record
whose ``error`` is set stands for an image (or an archive problem) that could not be read, for
the labeler to write as an ``error`` row. In tars, a member whose name escapes the archive
(``../x.jpg``, ``/abs/x.jpg``) or is not a regular file is never read; a truncated archive yields
the records read so far plus one error record naming the truncation; an image without json gets
``sam_json=None``; a json without image gives an error record.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from pipeline.sources.listing import DEFAULT_SHARD_SIZE, IMAGE_EXTENSIONS, Shard, list_shards

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # files/members larger than this become error records
_TAR_BUFSIZE = 1 << 20  # bytes per read from the tar stream (the default is 10 KiB)


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
