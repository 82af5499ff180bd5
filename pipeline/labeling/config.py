"""The labeling job's configuration and the marker columns its rows carry between stages.

``LabelJobConfig`` is what ``python -m jobs.label`` asks for, and all that the Ray tasks and
actors need (it is picklable). The job's reader ends every shard with an *end marker* row: the
marker columns ``END`` (True on that row) and ``COUNT`` (the shard's number of images, on that
row) travel through decoding and labeling untouched, and the part writer turns them into the
records that let the driver close the shard.

This module imports nothing from the rest of the labeling stage (job, transform, labeler, parts,
sinks), so each of them can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.sources import decode
from pipeline.vocabulary import Vocabulary

END = "_end"  # True on a shard's end marker row (the job's reader adds it)
COUNT = "_count"  # the shard's number of images, on the end marker
MARKER_COLUMNS = (END, COUNT)


@dataclass(frozen=True)
class LabelJobConfig:
    """What `python -m jobs.label` asks for; everything the actors need is in here (picklable)."""

    inputs: tuple[
        str, ...
    ]  # folders, SA-1B tar shards (or folders of them), manifests; local or fsspec
    output: str  # folder or URI (s3://, gs://, ...) of the Parquet files and _summary.json
    vocabulary_json: str  # pipeline.vocabulary.Vocabulary.to_json()
    checkpoint: str = "tiny"  # "tiny", a checkpoint folder, a release .pth, or "random:<preset>"
    sam_checkpoint: str | None = (
        None  # SAM weights for images without SA-1B masks; None = HIPIE only
    )
    sam_model_type: str = "vit_h"  # segment-anything registry key of the SAM checkpoint
    clip: str | None = None  # "MODEL:PRETRAINED" for the CLIP ensemble (Eq. 4); None = off
    replace_classes: tuple[str, ...] = ("person", "bird")  # HIPIE masks replace SAM's (App. A.8.2)
    batch_size: int = 4  # images per labeler call
    actors: int = 1  # labeler actors (one per GPU on a GPU cluster)
    gpus_per_actor: float = 0.0  # 1 on GPU clusters
    cpus_per_actor: float = 0.5  # fractional on small machines, so read/decode tasks still run
    folder_shard_size: int = 256  # images per output file for folder and manifest inputs
    max_pixels: int = decode.DEFAULT_MAX_PIXELS  # larger images become error rows (bombs)
    topk: int = 3  # labels and scores kept per mask
    overwrite: bool = False  # relabel shards whose output already exists
    test_size: int | None = None  # inference size (release: shortest edge); None = the model's

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_json(self.vocabulary_json)
