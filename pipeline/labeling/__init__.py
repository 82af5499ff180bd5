"""Labeling on Ray: shards of images in, one schema-v1 Parquet file per shard out. ``config``
holds the job's configuration and the end-marker columns; ``transform`` decodes and labels a Ray
Dataset (``label_dataset``); ``labeler`` is the actor that runs HIPIE, the SAM vote and the class
replacement; ``parts`` writes part files on the workers and commits each shard exactly once;
``sinks`` writes the shard files (atomic, resumable) and the run summary; ``job`` runs it all
(``python -m jobs.label``).
"""
