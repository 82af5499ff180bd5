"""Review in FiftyOne: label Parquet files ingested into a dataset (``ingest``, with the images
made local by ``media``), the dataset set up for the App (``app``: colours by class, uncertainty
margins, saved views), the reviewers' corrections read back as schema-v1 rows (``read``), and
HIPIE as a FiftyOne model for ``dataset.apply_model`` (``model``). The field names, tags and run
ids they share are in ``fields``.
"""
