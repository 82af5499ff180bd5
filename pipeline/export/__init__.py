"""Export: schema-v1 label rows, from label Parquet files or from a reviewed FiftyOne dataset, to
training sets in COCO instances, COCO panoptic or Parquet (``formats``, which also lists an
output's label files). Nothing here imports FiftyOne.
"""
