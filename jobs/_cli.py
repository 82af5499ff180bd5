"""Command-line checks shared by the ``jobs.*`` entry points.

A user's mistake on the command line (an input that does not exist, a vocabulary file that does
not parse, a folder that is not a checkpoint, a dataset that is not there) is reported as one
line on stderr, ``<prog>: error: <what is wrong>``, with exit status 2 (argparse's status for
usage errors), before Ray or FiftyOne start; never as a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2  # exit status of a command-line mistake, as argparse uses it


class UsageError(Exception):
    """A mistake on the command line; its message is shown to the user as it is."""


def one_line(error: BaseException | str) -> str:
    """An exception's message (or any text) folded onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """``main(argv)``, with a ``UsageError`` turned into one stderr line and status 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return USAGE_ERROR


def existing_file(path: str, option: str) -> Path:
    """``path`` as a Path; a UsageError unless it is an existing file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file")
    if not p.is_file():
        raise UsageError(f"{option} {path}: not a file")
    return p


def existing_folder(path: str, option: str) -> Path:
    """``path`` as a Path; a UsageError unless it is an existing folder."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such folder")
    if not p.is_dir():
        raise UsageError(f"{option} {path}: not a folder")
    return p


def label_files(path: str, option: str = "--labels") -> list[Path] | list[str]:
    """The label Parquet files under ``path`` (a file or a folder); a UsageError when there are
    none."""
    from pipeline.export.formats import label_files as find
    from pipeline.storage import is_uri

    if not is_uri(path) and not Path(path).exists():
        raise UsageError(f"{option} {path}: no such file or folder")
    try:
        return find(path)
    except (FileNotFoundError, OSError, ValueError) as e:  # also: an unreachable URI
        raise UsageError(f"{option} {path}: {one_line(e)}") from None


def json_file(path: str, option: str) -> object:
    """The parsed content of a JSON file; a UsageError when it is missing or not JSON."""
    p = existing_file(path, option)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{option} {path}: not valid JSON: {one_line(e)}") from None


def checkpoint(value: str, option: str, *, shipped_may_be_missing: bool = False) -> None:
    """A UsageError unless ``value`` names a HIPIE model that can be loaded: a preset's shipped
    weights ("tiny"), ``random:<preset>``, a checkpoint folder (``model.safetensors`` and
    ``config.json``, as ``hipie.save_checkpoint`` and ``hipie.convert`` write them), or a release
    checkpoint (``r50_parts.pth``, or a Hugging Face ``owner/repo/file.pth``).

    ``shipped_may_be_missing``: a preset name without shipped weights is fine (the caller falls
    back to random weights, as fine-tuning does).
    """
    if value.endswith((".pth", ".pt")) and not Path(value).is_dir():
        # a release checkpoint (r50_parts.pth), local or a hub owner/repo/file.pth
        from hipie.release_checkpoint import resolve_release_path

        try:
            resolve_release_path(value)
        except FileNotFoundError as e:
            raise UsageError(f"{option} {value}: {one_line(e)}") from None
        return
    if value.startswith("random:") or (not Path(value).exists() and "/" not in value):
        from hipie.build import PRESETS, WEIGHTS_DIR

        preset = value.split(":", 1)[1] if value.startswith("random:") else value
        if preset not in PRESETS:
            raise UsageError(
                f"{option} {value}: no such folder, and {preset!r} is not a preset "
                f"({', '.join(sorted(PRESETS))})"
            )
        shipped = WEIGHTS_DIR / preset
        if value.startswith("random:") or shipped_may_be_missing:
            return
        if not (shipped / "model.safetensors").is_file():
            raise UsageError(
                f"{option} {value}: this package ships no weights for {preset!r}; give a "
                f"checkpoint folder or random:{preset}"
            )
        return
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{option} {value}: no such folder")
    missing = [n for n in ("model.safetensors", "config.json") if not (path / n).is_file()]
    if not path.is_dir() or missing:
        raise UsageError(
            f"{option} {value}: not a HIPIE checkpoint folder (it needs model.safetensors and "
            "config.json, as hipie.save_checkpoint and jobs.train write them)"
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{option} {value}: config.json is not valid JSON: {one_line(e)}"
        ) from None
