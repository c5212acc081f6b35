"""Hugging Face transformers implementations of the same method: the ground truth
for parity tests and the place for modes vLLM cannot run (threshold scan)."""

from .audioflamingo3 import ReferenceAudioFlamingo3
from .base import (
    ProcessorWindowedSpeechLM,
    ReferenceOutput,
    ReferenceSpeechLM,
    calibrate_keep_ratio,
)
from .glmasr import ReferenceGlmAsr
from .kimi_audio import ReferenceKimiAudio
from .qwen2_audio import ReferenceQwen2Audio
from .qwen3asr import ReferenceQwen3Asr
from .qwen25omni import ReferenceQwen25Omni
from .qwen3omni import ReferenceQwen3Omni

__all__ = [
    "ReferenceSpeechLM",
    "ReferenceQwen2Audio",
    "ReferenceAudioFlamingo3",
    "ReferenceGlmAsr",
    "ReferenceKimiAudio",
    "ReferenceQwen3Asr",
    "ReferenceQwen25Omni",
    "ReferenceQwen3Omni",
    "ProcessorWindowedSpeechLM",
    "ReferenceOutput",
    "calibrate_keep_ratio",
]
