"""The label contract shared by the pipeline, review and export (no torch here)."""

from schemas import rle
from schemas.labels import (
    LABELS_V1,
    LEVELS,
    MASK_TYPE,
    ORIGINS,
    SCHEMA_VERSION,
    STATUSES,
    SchemaError,
    count_levels,
    instance_of,
    make_error_row,
    make_mask,
    make_ok_row,
    read_metadata,
    read_parquet,
    rows_to_table,
    validate_table,
    write_parquet,
)

__all__ = [
    "LABELS_V1",
    "LEVELS",
    "MASK_TYPE",
    "ORIGINS",
    "SCHEMA_VERSION",
    "STATUSES",
    "SchemaError",
    "count_levels",
    "instance_of",
    "make_error_row",
    "make_mask",
    "make_ok_row",
    "read_metadata",
    "read_parquet",
    "rle",
    "rows_to_table",
    "validate_table",
    "write_parquet",
]
