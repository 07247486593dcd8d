"""Corpus reading, token shards, masking and batching."""
