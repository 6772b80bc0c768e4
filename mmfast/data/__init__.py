"""Datasets of image-caption pairs (webdataset shards, CSV/JSONL files) and the bundled synthetic data."""
from mmfast.data.pairs import FilePairs, ShardPairs
from mmfast.data.synth import class_names, write_shards

__all__ = ["FilePairs", "ShardPairs", "class_names", "write_shards"]
