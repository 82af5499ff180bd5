"""Fine-tune HIPIE on reviewed labels with Ray Train; the result labels with `jobs.label`.

Examples:
  # the samples tagged "reviewed" in a FiftyOne dataset, 2 CPU workers on a local cluster:
  python -m jobs.train --dataset my-review --init tiny --output runs/ft1 --workers 2

  # the labels that dataset.apply_model(HipieModel(...), label_field="hipie") wrote, all samples:
  python -m jobs.train --dataset my-photos --label-field hipie --tag '' --output runs/ft1

  # an export (jobs.export --format parquet) on a GPU cluster, one worker per GPU; the output
  # and Ray Train storage on a file system all nodes share:
  ray job submit --working-dir . -- python -m jobs.train --labels /shared/export/ \\
      --init /ckpt/hipie-r50 --output /shared/ft1 --workers 8 --gpu --steps 2000

  # then relabel with the fine-tuned model and the classes it learned:
  python -m jobs.label --input photos/ --output labels_v2/ \\
      --checkpoint runs/ft1/checkpoint --vocabulary runs/ft1/vocabulary.json

The final model goes to OUTPUT/checkpoint, its classes to OUTPUT/vocabulary.json, a line per
step to OUTPUT/train_log.jsonl. A failed worker resumes from the last checkpoint; rerunning the
same command continues an interrupted run (--overwrite starts afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs import _cli
from jobs._cli import UsageError
from pipeline.finetune.data import (
    TrainingSet,
    training_set_from_coco,
    training_set_from_dataset,
    training_set_from_labels,
)
from pipeline.finetune.train import FinetuneConfig, run_finetune

PROG = "python -m jobs.train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("training data (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="NAME", help="FiftyOne dataset with reviewed samples")
    source.add_argument("--labels", metavar="DIR", help="label Parquet files (all ok rows)")
    source.add_argument("--coco", metavar="JSON", help="COCO instances JSON (e.g. jobs.export)")
    data.add_argument(
        "--tag",
        default="reviewed",
        help="with --dataset: train on samples with this tag; '' for all (default: reviewed)",
    )
    data.add_argument(
        "--label-field",
        metavar="PREFIX",
        help="with --dataset: the label_field given to apply_model (default: the ingest's "
        "fields if any, else the one apply_model run)",
    )
    data.add_argument("--images", metavar="DIR", help="with --coco: the image folder")
    data.add_argument(
        "--database-uri", help="with --dataset: MongoDB URI (default: FiftyOne's bundled MongoDB)"
    )
    model = p.add_argument_group("model and output")
    model.add_argument(
        "--init",
        default="tiny",
        metavar="tiny|random:PRESET|PATH",
        help="weights to start from (default: tiny, the shipped model)",
    )
    model.add_argument("--output", required=True, metavar="DIR", help="output folder")
    model.add_argument("--overwrite", action="store_true", help="do not continue an earlier run")
    opt = p.add_argument_group("optimization")
    d = FinetuneConfig(output="")
    opt.add_argument("--steps", type=int, default=d.steps, help=f"(default: {d.steps})")
    opt.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="images per worker and step"
    )
    opt.add_argument("--lr", type=float, default=d.lr, help=f"base lr (default: {d.lr})")
    opt.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=d.backbone_lr_mult,
        help=f"image encoder lr factor (default: {d.backbone_lr_mult})",
    )
    opt.add_argument("--freeze-backbone", action="store_true", help="keep the image encoder fixed")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument(
        "--image-size",
        type=int,
        help="training size (longer side), also the saved model's test size (default: the "
        "initial model's)",
    )
    opt.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    opt.add_argument(
        "--report-every", type=int, default=d.report_every, help="steps between Ray reports"
    )
    opt.add_argument("--seed", type=int, default=d.seed)
    ray_args = p.add_argument_group("Ray")
    ray_args.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="existing Ray cluster (default: $RAY_ADDRESS, else a local cluster for this run)",
    )
    ray_args.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    ray_args.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ray_args.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: 1)"
    )
    ray_args.add_argument(
        "--max-failures", type=int, default=d.max_failures, help="worker-group restarts allowed"
    )
    ray_args.add_argument(
        "--storage", help="Ray Train storage shared by all nodes (default: OUTPUT/ray)"
    )
    ray_args.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything a user can get wrong that can be checked before FiftyOne or Ray start.

    Raises:
        UsageError: missing label files, COCO JSON or image folder; an --init that is no model.
    """
    if args.labels:
        _cli.label_files(args.labels)
    if args.coco:
        _cli.json_file(args.coco, "--coco")
        if not args.images:
            raise UsageError("--coco needs --images DIR")
        _cli.existing_folder(args.images, "--images")
    _cli.checkpoint(args.init, "--init", shipped_may_be_missing=True)
    for name in ("steps", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


def training_set_from_args(args: argparse.Namespace) -> TrainingSet:
    if args.dataset:
        if args.database_uri:
            if "fiftyone" in sys.modules:
                raise UsageError("--database-uri must be given before FiftyOne is imported")
            os.environ["FIFTYONE_DATABASE_URI"] = args.database_uri
        import fiftyone as fo

        if not fo.dataset_exists(args.dataset):
            raise UsageError(f"dataset {args.dataset!r} does not exist")
        try:
            return training_set_from_dataset(
                args.dataset, tag=args.tag or None, label_field=args.label_field
            )
        except ValueError as exc:
            raise UsageError(f"--dataset {args.dataset}: {exc}") from None
    if args.labels:
        return training_set_from_labels(args.labels)
    return training_set_from_coco(args.coco, args.images)


def main(argv: list[str] | None = None) -> int:
    """The command; a mistake on the command line exits with status 2 and one line on stderr."""
    return _cli.run(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    from jobs.label import init_ray

    args = build_parser().parse_args(argv)
    check_args(args)
    training_set = training_set_from_args(args)
    if not len(training_set):
        raise UsageError("no training images: no ok row with a usable mask in the given data")
    print(
        f"{len(training_set)} training images; things {list(training_set.things)}, "
        f"stuff {list(training_set.stuff)}, {len(training_set.parts)} part classes"
    )
    init_ray(args.address, args.num_cpus)
    config = FinetuneConfig(
        output=args.output,
        init=args.init,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        freeze_backbone=args.freeze_backbone,
        warmup_steps=args.warmup_steps,
        image_size=args.image_size,
        workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        checkpoint_every=args.checkpoint_every,
        report_every=args.report_every,
        max_failures=args.max_failures,
        seed=args.seed,
        storage=args.storage,
        overwrite=args.overwrite,
    )
    result = run_finetune(config, training_set)
    summary = {
        "checkpoint": str(result.checkpoint),
        "vocabulary": str(result.checkpoint.parent / "vocabulary.json"),
        "step": result.step,
        "loss": result.metrics.get("loss"),
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
