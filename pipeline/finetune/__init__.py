"""Fine-tuning: reviewed label rows (from a FiftyOne dataset, label Parquet files or a COCO
export) turned into HIPIE training examples (``data``), and HIPIE fine-tuned on them with Ray
Train, with checkpoints and resume (``train``, ``python -m jobs.train``).
"""
