"""`python -m jobs.review`: ingest label Parquet files into FiftyOne and open a review session.

    python -m jobs.review --labels DIR --dataset NAME [--media-dir DIR] [--replace-unreviewed]
        [--launch] [--port 5151] [--address 127.0.0.1] [--database-uri URI]

The dataset is persistent, on FiftyOne's bundled MongoDB unless ``--database-uri`` names another
(FiftyOne's ``database_uri``). ``--launch`` serves the App on ``address:port`` (localhost by
default: reach it from a laptop with ``ssh -N -L PORT:localhost:PORT user@host``) and blocks until
interrupted. Without ``--labels``, the command refreshes an existing dataset after review edits
(``pipeline.review.app.refresh_review``): parts' ``instance_label`` follows their instance's
current label, margins, colours for renamed classes, saved views; for the ingest's fields and each
``apply_model`` run's. The logic lives in ``pipeline.review.ingest`` and ``pipeline.review.app``.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs import _cli
from jobs._cli import UsageError

PROG = "python -m jobs.review"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--labels", help="label Parquet file or folder to ingest (optional)")
    parser.add_argument("--dataset", required=True, help="FiftyOne dataset name")
    parser.add_argument(
        "--media-dir",
        help="where tar/remote images go (default <labels>/media; for labels in object storage a "
        "local cache, ~/.cache/hipie/media/<digest>)",
    )
    parser.add_argument(
        "--replace-unreviewed",
        action="store_true",
        help="a new labeling run overwrites samples nobody reviewed or edited (default: new fields)",
    )
    parser.add_argument("--launch", action="store_true", help="serve the FiftyOne App and wait")
    parser.add_argument("--port", type=int, default=5151, help="App port (default 5151)")
    parser.add_argument("--address", default="127.0.0.1", help="App address (default 127.0.0.1)")
    parser.add_argument("--database-uri", help="MongoDB URI (default: FiftyOne's bundled MongoDB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command; a mistake on the command line exits with status 2 and one line on stderr."""
    return _cli.run(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.labels:
        _cli.label_files(args.labels)  # before FiftyOne starts its database
    if args.database_uri:
        # FiftyOne reads its config on import: set the URI before importing it.
        if "fiftyone" in sys.modules:
            raise UsageError("--database-uri must be given before FiftyOne is imported")
        os.environ["FIFTYONE_DATABASE_URI"] = args.database_uri
    import fiftyone as fo

    from pipeline.review import fields, ingest

    if args.labels:
        dataset, result = ingest.ingest_labels(
            args.labels,
            args.dataset,
            media_dir=args.media_dir,
            replace_unreviewed=args.replace_unreviewed,
        )
        print(
            f"dataset {dataset.name!r}: {len(dataset)} samples; this ingest added {result.added}, "
            f"unchanged {result.unchanged}, replaced {result.replaced}, "
            f"new versions {result.versioned}, error rows {result.errors}, "
            f"unreadable images {result.media_errors} (tag {fields.MEDIA_ERROR_TAG!r})",
            flush=True,
        )
    elif fo.dataset_exists(args.dataset):
        from pipeline.review.app import refresh_review

        dataset = fo.load_dataset(args.dataset)
        views = refresh_review(dataset)  # after edits: instance_label, margins, colours, views
        print(
            f"dataset {dataset.name!r}: {len(dataset)} samples; refreshed instance_label, "
            f"margins, colours and the saved views {sorted(views)}",
            flush=True,
        )
    else:
        raise UsageError(f"dataset {args.dataset!r} does not exist; give --labels to create it")
    if not args.launch:
        return 0
    session = fo.launch_app(dataset, address=args.address, port=args.port, auto=False, remote=True)
    print(f"FiftyOne App: http://{args.address}:{args.port}/", flush=True)
    print(
        f"from a laptop: ssh -N -L {args.port}:localhost:{args.port} <user>@<this host>, "
        f"then open http://localhost:{args.port}/ (Ctrl-C here stops the App)",
        flush=True,
    )
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
