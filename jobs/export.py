"""`python -m jobs.export`: write a training set from label files or a reviewed FiftyOne dataset.

    python -m jobs.export (--labels DIR | --dataset NAME [--tag reviewed] [--version N]
        [--label-field PREFIX]) --format coco|coco-panoptic|parquet --output DIR
        [--categories FILE] [--database-uri URI]

From ``--dataset`` the export takes the fields' current values, i.e. the reviewers' corrections;
``--tag`` keeps only samples with that tag. ``--label-field`` picks the labels of
``dataset.apply_model(..., label_field=PREFIX)`` (default: the ingest's fields when the dataset
has them, else its one ``apply_model`` run; ``pipeline.review.read``). ``--categories`` is a
COCO category list (JSON, a list or a dict with "categories") whose ids the export keeps. The
logic lives in ``pipeline.export.formats``.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs import _cli
from jobs._cli import UsageError
from pipeline.export import formats

PROG = "python -m jobs.export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="label Parquet file or folder")
    source.add_argument("--dataset", help="FiftyOne dataset name")
    parser.add_argument("--tag", help="with --dataset: only samples with this tag (e.g. reviewed)")
    parser.add_argument("--version", type=int, default=1, help="with --dataset: label version")
    parser.add_argument(
        "--label-field",
        metavar="PREFIX",
        help="with --dataset: the label_field given to apply_model (default: detected)",
    )
    parser.add_argument("--format", required=True, choices=formats.FORMATS)
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--categories", help="COCO categories JSON whose ids to keep")
    parser.add_argument("--database-uri", help="MongoDB URI (default: FiftyOne's bundled MongoDB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command; a mistake on the command line exits with status 2 and one line on stderr."""
    return _cli.run(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    categories = None
    if args.categories:
        data = _cli.json_file(args.categories, "--categories")
        categories = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(categories, list):
            raise UsageError(
                f"--categories {args.categories}: expected a list of categories or a dict with "
                "'categories'"
            )
    if args.labels:
        _cli.label_files(args.labels)
        rows, vocabulary = formats.rows_from_labels(args.labels)
        reviewed: set[str] = set()
    else:
        if args.database_uri:
            if "fiftyone" in sys.modules:
                raise UsageError("--database-uri must be given before FiftyOne is imported")
            os.environ["FIFTYONE_DATABASE_URI"] = args.database_uri
        import fiftyone as fo

        from pipeline.review import read

        if not fo.dataset_exists(args.dataset):
            raise UsageError(f"dataset {args.dataset!r} does not exist")
        dataset = fo.load_dataset(args.dataset)
        view = dataset.match_tags(args.tag) if args.tag else dataset
        try:
            rows, reviewed = read.read_rows(
                view, version=args.version, label_field=args.label_field
            )
        except ValueError as exc:
            raise UsageError(f"--dataset {args.dataset}: {exc}") from None
        vocabulary = {"vocabularies": dataset.info.get("vocabularies", {})}
    result = formats.export_rows(
        rows,
        args.output,
        format=args.format,
        categories=categories,
        reviewed=reviewed,
        vocabulary=vocabulary,
    )
    print(
        f"{result.format}: {result.num_images} images, {result.num_annotations} annotations -> "
        + ", ".join(str(p) for p in result.paths),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
