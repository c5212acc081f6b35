"""Hugging Face transformers implementations of the same method: the ground truth
for parity tests and the place for modes vLLM cannot run (threshold scan)."""

from .qwen2_audio import ReferenceOutput, ReferenceQwen2Audio, calibrate_keep_ratio

__all__ = ["ReferenceQwen2Audio", "ReferenceOutput", "calibrate_keep_ratio"]
