"""The images behind review samples: label rows' URIs turned into local files FiftyOne can show.

Plain local paths are used as they are; ``file://`` is stripped; SA-1B members
``tar://<tar>#<member>`` are extracted (that member only, one streaming pass per tar and batch);
other URIs are copied with fsspec. Whatever cannot be had (a missing file, a missing or cut-off
tar, a member that is not there, an unreachable URI, a path FiftyOne would not take for an image)
gets a one-line reason instead of an exception, so that one bad image never stops an ingest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import fiftyone as fo


class MediaResolver:
    """Turns row URIs into local image paths, materializing archive members and remote files.

    ``tar://<tar>#<member>`` extracts only ``member`` (by name, one pass over each tar per batch)
    to ``media_dir/<tar stem>/<member basename>``; the target is checked to lie inside
    ``media_dir``. Files already there are reused, so re-ingest extracts nothing. Media that
    cannot be had (``resolve_with_errors``) get a reason and, where no image path exists at all,
    a placeholder path under ``media_dir/unavailable/`` that is never created.
    """

    def __init__(self, *, media_dir: str | os.PathLike):
        self.media_dir = Path(media_dir).resolve()

    @staticmethod
    def _safe_name(name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name.replace("\\", "/")))
        if base in ("", ".", ".."):
            raise ValueError(f"cannot make a file name from {name!r}")
        return base

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if self.media_dir not in resolved.parents:
            raise ValueError(f"{path} lies outside the media folder {self.media_dir}")
        return resolved

    def target(self, uri: str) -> Path | None:
        """The local path of ``uri`` (None for a plain local path, which is used as it is)."""
        if uri.startswith("tar://"):
            tar_path, _, member = uri[len("tar://") :].rpartition("#")
            if not tar_path or not member:
                raise ValueError(f"tar URI without '#member': {uri}")
            stem = self._safe_name(Path(tar_path).name.split(".")[0] or "tar")
            return self._inside(self.media_dir / stem / self._safe_name(member))
        if uri.startswith("file://") or "://" not in uri:
            return None
        digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
        return self._inside(self.media_dir / "remote" / f"{digest}_{self._safe_name(uri)}")

    def placeholder(self, uri: str) -> str:
        """A path that stands for media that cannot be shown (never created): an image path, as
        FiftyOne's image datasets require, unique per URI."""
        digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
        return str(self.media_dir / "unavailable" / f"{digest}.png")

    def resolve(self, uris: Sequence[str]) -> list[str]:
        """Local paths for ``uris`` (same order); see ``resolve_with_errors``."""
        return [path for path, _ in self.resolve_with_errors(uris)]

    def resolve_with_errors(self, uris: Sequence[str]) -> list[tuple[str, str | None]]:
        """(local path, None) or (intended path, why the image cannot be shown) per URI.

        Unreadable media never stop the batch: a missing file, a tar that is missing or cut off
        (members before the cut are extracted, the rest get the reason), a member that is not in
        the archive, or a remote URI that cannot be fetched become that URI's error.
        """
        results: list[tuple[str, str | None]] = []
        wanted: dict[str, dict[str, Path]] = defaultdict(dict)  # tar path -> member -> target
        for uri in uris:
            try:
                target = self.target(uri)
            except ValueError as e:
                results.append((self.placeholder(uri), f"unusable media URI: {e}"))
                continue
            path = str(target) if target is not None else uri.removeprefix("file://")
            if not path:
                results.append((self.placeholder(uri), "the row has no image URI"))
                continue
            if fo.core.media.get_media_type(path) != fo.core.media.IMAGE:
                # e.g. the tar itself (an archive-level error row) or an orphan mask json
                reason = f"not an image file name (FiftyOne shows images by extension): {uri}"
                results.append((self.placeholder(uri), reason))
                continue
            if target is None:
                found = os.path.isfile(path)
                results.append((path, None if found else f"image file not found: {path}"))
                continue
            results.append((path, None))
            if target.exists():
                continue
            if uri.startswith("tar://"):
                tar_path, _, member = uri[len("tar://") :].rpartition("#")
                wanted[tar_path][member] = target
            else:
                try:
                    self._copy_remote(uri, target)
                except Exception as e:
                    results[-1] = (path, f"cannot fetch {uri}: {_reason(e)}")
        errors: dict[str, str] = {}  # target path -> reason
        for tar_path, members in wanted.items():
            errors.update(self._extract(tar_path, members))
        return [(path, error or errors.get(path)) for path, error in results]

    @staticmethod
    def _write_atomic(source, target: Path, size: int | None = None) -> None:
        """Copy ``source`` to ``target`` under a temporary name; ``size``: the bytes expected
        (a shorter copy is a cut-off file and is not kept)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
                written = out.tell()
            if size is not None and written != size:
                raise EOFError(f"cut off after {written} of {size} bytes")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _extract(self, tar_path: str, members: dict[str, Path]) -> dict[str, str]:
        """Extract ``members`` in one streaming pass; returns target path -> reason for those
        that could not be extracted."""
        import fsspec

        left = dict(members)
        errors: dict[str, str] = {}
        current: Path | None = None  # the member being written when the stream fails
        try:
            with fsspec.open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:  # streaming: one pass, only the named members are read
                    target = left.pop(info.name, None)
                    if target is None:
                        continue
                    if info.isfile():
                        current = target
                        self._write_atomic(tar.extractfile(info), target, info.size)
                        current = None
                    else:
                        errors[str(target)] = f"tar member {info.name!r} is not a regular file"
                    if not left:
                        break
        except Exception as e:  # missing, unreadable or cut-off archive: the stream is done
            reason = f"cannot read tar {tar_path}: {_reason(e)}"
            for target in [*([current] if current else []), *left.values()]:
                errors[str(target)] = reason
            left = {}
        for member, target in left.items():
            errors[str(target)] = f"no member {member!r} in {tar_path}"
        return errors

    def _copy_remote(self, uri: str, target: Path) -> None:
        import fsspec

        with fsspec.open(uri, "rb") as source:
            self._write_atomic(source, target)


def _reason(e: BaseException) -> str:
    """An exception as one line: its type and message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
