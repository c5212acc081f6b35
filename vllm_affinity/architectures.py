"""The architectures the plugin serves, as data: what the engine must know of each
without importing it (pure Python, no vLLM import).

``register()`` registers every entry's adapter class with vLLM's model registry as a
"module:Class" string (imported lazily by vLLM), and the deep-stage config hook for the
entries that allow a deep stage. The engine (config hook, scheduler, runner) reads an
entry through :func:`facts_for` and the server SPEC through :func:`~vllm_affinity.config.server_config`;
it never imports an adapter.

Adding an architecture: one adapter file in ``vllm_affinity/adapters/`` and one entry here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .config import HF_CONFIG_KEY, AffinityConfig, AffinityConfigError

#: where the audio's positions come from
Positions = Literal["rope-1d", "mrope", "learned"]
#: how audio over one encoder window is handled:
#: "plugin-windows" the plugin encodes consecutive windows when ``long_audio: windows``;
#: "native"         the stock processor already splits into windows (up to ``max_audio_seconds``);
#: "truncate"       the stock model sees the first window only (the SPEC's ``long_audio`` is ignored)
LongAudio = Literal["plugin-windows", "native", "truncate"]


@dataclass(frozen=True)
class ArchFacts:
    architecture: str  # vLLM registry name
    adapter: str  # "module:Class" of the plugin's model class
    name: str  # for log lines and errors
    window_seconds: float  # one encoder window
    tokens_per_window: int  # placeholders of one full window before pooling
    deep_stage: bool  # a decoder-only LM whose sequence holds the audio positions
    positions: Positions
    long_audio: LongAudio
    #: where the input stage's size-weighted attention is implemented ("" : nowhere yet)
    size_weighted_in: str = ""
    #: the deep stage's size-weighted attention is implemented (and parity-tested) here
    deep_size_weighted: bool = False
    #: the encoder stage (merging between audio-encoder layers) is implemented here
    encoder_stage: bool = False

    def validate(self, cfg: AffinityConfig) -> AffinityConfig:
        """The server SPEC, checked against what this architecture allows."""
        if cfg.deep is not None and not self.deep_stage:
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.deep is not supported for "
                f"{self.name}: the deep stage merges audio positions inside a decoder-only speech LM's "
                f"sequence, and {self.name}'s decoder has none (it reads the audio through "
                "cross-attention). Use the input stage alone, e.g. the preset 'input-only' or "
                '{"input": {"keep_ratio": 0.74}}'
            )
        if cfg.encoder is not None and not self.encoder_stage:
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.encoder is not implemented for "
                f"{self.name} yet (Whisper, whose accuracy is measured on real weights here, and Qwen2-Audio, "
                "parity-tested against the reference). Remove it"
            )
        if cfg.deep is not None and cfg.deep.size_weighted and not self.deep_size_weighted:
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.deep.size_weighted is not "
                f"implemented for {self.name} yet (parity-tested on Qwen2-Audio only). Remove it, or set "
                "it to false"
            )
        if cfg.input is not None and cfg.input.size_weighted and not self.size_weighted_in:
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.input.size_weighted is not "
                f"implemented for {self.name} (only where the merged rows are read by an attention "
                "the plugin owns: Whisper's cross-attention). Remove it, or set it to false"
            )
        if cfg.input is not None and cfg.input.kv_block_align not in ("off", "auto") and not self.deep_stage:
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.input.kv_block_align is for "
                f"decoder-only speech LMs, whose prompt holds the audio and is prefix-cached; {self.name}'s "
                "decoder reads the audio through cross-attention, which vLLM does not prefix-cache. Remove it"
            )
        return cfg

    def audio_seconds_limit(self, cfg: AffinityConfig) -> float | None:
        """Longest audio this server accepts (None: any; the stock model truncates or
        the stock processor applies its own limit)."""
        if self.long_audio == "native":
            return cfg.native_audio_seconds_limit
        if self.long_audio == "plugin-windows":
            return cfg.audio_seconds_limit
        return cfg.max_audio_seconds

    def max_windows(self, cfg: AffinityConfig) -> int | None:
        """Encoder windows one audio may span on this server (None: the stock processor's
        own limit decides)."""
        if self.long_audio == "truncate" or (self.long_audio == "plugin-windows" and cfg.long_audio != "windows"):
            return 1
        limit = self.audio_seconds_limit(cfg)
        return None if limit is None else max(1, math.ceil(round(limit / self.window_seconds, 6)))

    def max_item_tokens(self, cfg: AffinityConfig) -> int | None:
        """Most placeholders one audio can have before pooling (sizes vLLM's encoder
        budget and, with a deep stage, the step budget: a span is prefilled whole)."""
        windows = self.max_windows(cfg)
        return None if windows is None else windows * self.tokens_per_window


ARCHITECTURES: dict[str, ArchFacts] = {
    f.architecture: f
    for f in (
        ArchFacts(
            "Qwen2AudioForConditionalGeneration",
            "vllm_affinity.adapters.qwen2_audio:AffinityQwen2AudioForConditionalGeneration",
            "Qwen2-Audio", 30, 750, deep_stage=True, positions="rope-1d", long_audio="plugin-windows",
            deep_size_weighted=True, encoder_stage=True,
        ),
        ArchFacts(
            "AudioFlamingo3ForConditionalGeneration",
            "vllm_affinity.adapters.audioflamingo3:AffinityAudioFlamingo3ForConditionalGeneration",
            "AudioFlamingo3", 30, 750, deep_stage=True, positions="rope-1d", long_audio="native",
        ),
        ArchFacts(
            "GlmAsrForConditionalGeneration",
            "vllm_affinity.adapters.glmasr:AffinityGlmAsrForConditionalGeneration",
            "GLM-ASR", 30, 375, deep_stage=True, positions="rope-1d", long_audio="native",
        ),
        ArchFacts(
            "Qwen3ASRForConditionalGeneration",
            "vllm_affinity.adapters.qwen3_asr:AffinityQwen3AsrForConditionalGeneration",
            # M-RoPE in vLLM's module, positions read from the placeholder run (already K)
            "Qwen3-ASR", 30, 390, deep_stage=True, positions="mrope", long_audio="native",
        ),
        *(
            ArchFacts(
                architecture,
                "vllm_affinity.adapters.qwen2_5_omni:AffinityQwen25OmniThinkerForConditionalGeneration",
                # vLLM asks transformers' processor not to truncate: any length, chunked encoder
                "Qwen2.5-Omni", 30, 750, deep_stage=True, positions="mrope", long_audio="native",
            )
            for architecture in ("Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration")
        ),
        ArchFacts(
            "Qwen3OmniMoeForConditionalGeneration",
            "vllm_affinity.adapters.qwen3_omni:AffinityQwen3OmniMoeThinkerForConditionalGeneration",
            "Qwen3-Omni", 30, 390, deep_stage=True, positions="mrope", long_audio="native",
        ),
        ArchFacts(
            "MoonshotKimiaForCausalLM",
            "vllm_affinity.adapters.kimi_audio:AffinityKimiAudioForConditionalGeneration",
            # its feature extractor truncates at 30 s: 390 placeholders at most
            "Kimi-Audio", 30, 390, deep_stage=True, positions="rope-1d", long_audio="truncate",
        ),
        ArchFacts(
            "WhisperForConditionalGeneration",
            "vllm_affinity.adapters.whisper:AffinityWhisperForConditionalGeneration",
            "Whisper", 30, 1500, deep_stage=False, positions="learned", long_audio="truncate",
            size_weighted_in="the decoder's cross-attention", encoder_stage=True,
        ),
    )
}


_NOT_YET = ("not adapted yet: an architecture needs an adapter, a tiny checkpoint and a transformers "
            "reference its parity tests run against (docs/adapters.md, 'Adding an architecture')")

#: audio architectures vLLM serves that the plugin does not adapt, and why. A server given a
#: SPEC for one of them stops at start-up with the reason (engine/config_hook.py) instead of
#: silently serving stock vLLM while the user believes pooling is on.
NOT_ADAPTED: dict[str, str] = {
    "VoxtralForConditionalGeneration": (
        "Voxtral's prompt is built by mistral_common with the audio placeholders already in it (375 "
        "per 30 s chunk), and vLLM's Voxtral processor only locates them instead of inserting them, so "
        "the plugin's placeholder rewrite never applies (pooled embeddings would land on the wrong "
        "positions). What would make it possible: the adapter rewriting the located placeholder run to "
        "K tokens in the processor's _maybe_apply_prompt_updates (shown feasible on vLLM 0.32 without "
        "patching mistral_common, not built yet), plus a tiny Mistral-format checkpoint and a reference"
    ),
    "GraniteSpeechForConditionalGeneration": _NOT_YET,
    "MiDashengLMModel": _NOT_YET,
    "UltravoxModel": _NOT_YET,
    "Phi4MMForCausalLM": _NOT_YET,
    "Gemma3nForConditionalGeneration": _NOT_YET,
}


def facts_for(architecture: str) -> ArchFacts:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise KeyError(
            f"vllm-affinity: no adapter for architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}"
        ) from None


def facts_of_model_config(model_config) -> ArchFacts:
    """The entry of the architecture a vLLM ModelConfig serves (its first registered one)."""
    for arch in getattr(model_config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise KeyError(f"vllm-affinity: none of {model_config.architectures} has an adapter")
