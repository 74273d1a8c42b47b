"""Data directories, Parquet shards and the synthetic corpus (see docs/design.md)."""
