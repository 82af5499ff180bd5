"""Label an image collection with HIPIE on Ray and write class-aware hierarchical labels to Parquet.

Examples:
  # a folder of photos, on a local Ray cluster started for this run, shipped tiny model:
  python -m jobs.label --input photos/ --output labels/

  # SA-1B tar shards (their own SAM masks are used), on an existing cluster, 8 GPU actors (the
  # README's "Ray job submission": start Ray inside the project's environment; the token):
  RAY_AUTH_MODE=token ray job submit --address http://head:8265 --working-dir . -- \\
      python -m jobs.label --input s3://bucket/sa1b/ --output /shared/labels/ \\
      --checkpoint /ckpt/hipie-r50 --actors 8 --gpus-per-actor 1 --batch-size 8

Each input shard (a tar file, or a group of --shard-size folder/manifest images) becomes one Parquet
file in --output; a rerun skips shards already written (use --overwrite to relabel). Every image
gets one row: status "ok" with its masks, or "error" with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs import _cli
from jobs._cli import UsageError
from pipeline.labeling.config import LabelJobConfig
from pipeline.labeling.job import run_label_job
from pipeline.sources.listing import check_input
from pipeline.vocabulary import Vocabulary, VocabularyError, load_vocabulary

PROG = "python -m jobs.label"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URI",
        help="image folder, SA-1B .tar shard (or folder of them), or manifest (.parquet/.csv with a "
        "'uri' column); local path or s3://, gs://, file:// URI; repeat for several",
    )
    io.add_argument(
        "--output",
        required=True,
        metavar="DIR|URI",
        help="folder or URI (s3://, gs://, hdfs://) for the Parquet files; the workers write "
        "there directly",
    )
    io.add_argument(
        "--overwrite", action="store_true", help="relabel shards that already have output"
    )
    io.add_argument(
        "--shard-size",
        type=int,
        default=256,
        metavar="N",
        help="images per output file for folders and manifests (default: 256)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        default="tiny",
        metavar="tiny|PATH|FILE.pth",
        help="HIPIE weights: 'tiny' (shipped with the package), a checkpoint folder, a released "
        "checkpoint (r50_parts.pth, vit_h_cloud.pth, or a Hugging Face owner/repo/file.pth), or "
        "random:r50 / random:vit_h (the released architecture, random weights; for benchmarks) "
        "(default: tiny)",
    )
    model.add_argument(
        "--test-size",
        type=int,
        metavar="N",
        help="inference size: the shortest edge for released checkpoints (default 1024, as the "
        "release), the longer side for our own checkpoints (default: the checkpoint's)",
    )
    model.add_argument(
        "--sam-checkpoint",
        metavar="PATH",
        help="SAM weights for images that come without SA-1B masks; without it such images get "
        "HIPIE's own masks",
    )
    model.add_argument("--sam-model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    model.add_argument(
        "--clip",
        metavar="MODEL:PRETRAINED",
        help="open_clip model for the CLIP ensemble (Eq. 4), e.g. ViT-L-14:/path/weights.bin; off by default",
    )
    model.add_argument(
        "--replace-classes",
        default="person,bird",
        metavar="A,B",
        help="classes whose HIPIE masks replace SAM's masks (default: person,bird)",
    )
    vocab = p.add_argument_group(
        "vocabulary (default: the 133 COCO-panoptic classes + shipped parts)"
    )
    vocab.add_argument(
        "--vocabulary",
        metavar="FILE",
        help="YAML or text file with things/stuff/parts (and optionally synonyms, part_groups, "
        "thing_parts), or a shipped name: coco_panoptic, parts, synthetic",
    )
    vocab.add_argument(
        "--things", nargs="+", metavar="NAME", help="thing (countable object) classes"
    )
    vocab.add_argument("--stuff", nargs="+", metavar="NAME", help="stuff (background) classes")
    vocab.add_argument("--parts", nargs="+", metavar="NAME", help="part classes, e.g. head wheel")
    ray_args = p.add_argument_group("Ray")
    ray_args.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="existing Ray cluster (default: $RAY_ADDRESS, else a local cluster for this run)",
    )
    ray_args.add_argument("--batch-size", type=int, default=4, help="images per labeler call")
    ray_args.add_argument("--actors", type=int, default=1, help="labeler actors (one per GPU)")
    ray_args.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per labeler actor (default: 1 when the cluster has GPUs, else 0)",
    )
    ray_args.add_argument(
        "--cpus-per-actor",
        type=float,
        default=0.5,
        help="CPUs per labeler actor; keep it fractional on small machines (default: 0.5)",
    )
    ray_args.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    ray_args.add_argument("--no-progress", action="store_true", help="hide Ray's progress bars")
    return p


def vocabulary_from_args(args: argparse.Namespace) -> Vocabulary:
    """--vocabulary FILE, or --things/--stuff/--parts lists, or the shipped default.

    Raises:
        UsageError: both forms given, or the file is missing or malformed.
    """
    try:
        if args.things or args.stuff or args.parts:
            if args.vocabulary:
                raise UsageError("give either --vocabulary or --things/--stuff/--parts, not both")
            return Vocabulary.from_lists(
                things=args.things or (), stuff=args.stuff or (), parts=args.parts or ()
            )
        return load_vocabulary(args.vocabulary)
    except (VocabularyError, ValueError) as e:
        raise UsageError(f"vocabulary: {_cli.one_line(e)}") from None
    except OSError as e:  # FileNotFoundError and other file system errors
        raise UsageError(f"--vocabulary {args.vocabulary}: {_cli.one_line(e)}") from None


def check_args(args: argparse.Namespace) -> Vocabulary:
    """Everything a user can get wrong, checked before Ray starts; returns the vocabulary.

    Raises:
        UsageError: an input that does not exist or has an unsupported type, a bad vocabulary,
            a checkpoint that is not one, a SAM checkpoint file that does not exist.
    """
    for uri in args.input:
        try:
            check_input(uri)
        except (OSError, ValueError, ImportError) as e:  # ImportError: no fsspec driver (s3fs)
            raise UsageError(f"--input {uri}: {_cli.one_line(e)}") from None
    vocabulary = vocabulary_from_args(args)
    _cli.checkpoint(args.checkpoint, "--checkpoint")
    if args.sam_checkpoint:
        _cli.existing_file(args.sam_checkpoint, "--sam-checkpoint")
    for name in ("batch_size", "actors", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return vocabulary


def init_ray(address: str | None, num_cpus: int | None = None):
    """Connect to ``address`` or start a local cluster; returns the ray module."""
    import ray

    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env)
    return ray


def main(argv: list[str] | None = None) -> int:
    """The command; a mistake on the command line exits with status 2 and one line on stderr."""
    return _cli.run(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    vocabulary = check_args(args)
    ray = init_ray(args.address, args.num_cpus)
    # Which interpreter runs the job (with `ray job submit`: the first `python` on the PATH of
    # the head node's `ray start`, or of the job's runtime_env): see the README.
    print(f"jobs.label: python {sys.executable}, ray {ray.__version__}", flush=True)
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    config = LabelJobConfig(
        inputs=tuple(args.input),
        output=args.output,
        vocabulary_json=vocabulary.to_json(),
        checkpoint=args.checkpoint,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type,
        clip=args.clip,
        replace_classes=tuple(c.strip() for c in args.replace_classes.split(",") if c.strip()),
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=gpus,
        cpus_per_actor=args.cpus_per_actor,
        folder_shard_size=args.shard_size,
        overwrite=args.overwrite,
        test_size=args.test_size,
    )
    summary = run_label_job(config, progress=not args.no_progress)
    print(json.dumps(summary.to_dict(), indent=2))
    if summary.skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.skipped.items()))
        print(f"input files skipped ({counts}); see _summary.json for examples", flush=True)
    print(f"labels in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
