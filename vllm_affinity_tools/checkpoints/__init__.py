"""Checkpoint converters: real weights shipped in other formats, turned into transformers checkpoints."""
