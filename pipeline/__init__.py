"""The auto-labeling pipeline, a folder per stage: ``sources`` (inputs listed as shards and read,
images decoded), ``masks`` (class-agnostic masks: SA-1B json, SAM's generator), ``labeling`` (the
Ray job: config, transform, labeler, part files and Parquet sinks), ``review`` (FiftyOne ingest,
App setup, read-back, model), ``export`` (COCO, COCO panoptic, Parquet) and ``finetune`` (Ray
Train on reviewed labels); ``storage`` and ``vocabulary`` are shared by several stages.

Imports run one way, ``jobs`` -> ``pipeline`` -> ``hipie`` / ``schemas``, with no cycle between
modules or stages (``tests/pipeline/test_layout.py`` checks both).
"""
