"""Sources, class-agnostic masks, the Ray labeler, Parquet sinks, FiftyOne ingest and export."""
