"""Affinity Pooling on Kimi-Audio (``MoonshotKimiaForCausalLM``), built from transformers'
blocks: there is no transformers implementation of Kimi-Audio to lean on.

Written from the model's definition, independently of vLLM's module and of the plugin's
adapter: transformers' ``WhisperEncoder`` modules (conv1, conv2, positions, layers, final
LayerNorm) driven by hand, transformers' ``Qwen2ForCausalLM`` as the decoder, the VQ
adaptor and the embedding sum in plain torch. Generation (greedy loop, deep merge stage)
is :class:`~.base.ReferenceSpeechLM`'s; only the audio path is here.

The audio path of one 16 kHz audio (one audio per prompt, as Kimi-Audio takes):

1. the wave is zero-padded to a multiple of the hop (160) and featurised by the
   ``whisper-large-v3/`` feature extractor with ``padding="longest"`` (no padding to 30 s)
   and its default truncation at 30 s: ``T = min(ceil(n / 160), 3000)`` mel frames;
2. encoder: conv1, conv2 (stride 2) -> ``ceil(T / 2)`` frames plus the first that many
   learned positions, the encoder layers with no mask, LayerNorm (transformers'
   ``WhisperEncoder.forward`` insists on 3000 frames, so its modules run one by one);
3. the frames are zero-padded to a multiple of 4 and each 4 consecutive ones concatenated
   (``4 * d_model``), then the adaptor: Linear, GELU, Linear, LayerNorm: ``m`` rows;
4. the prompt's ``<|im_kimia_text_blank|>`` becomes ``n = 13 * (T // 100) + c(T % 100)``
   placeholders (``c`` three halvings of the remainder), which may exceed ``m`` (n = 390
   for m = 375 on 30 s). The LM input at placeholder ``i`` is the model's fusion
   ``(e_blank + a_i) * sqrt(2)`` for ``i < m`` and the bare blank embedding ``e_blank``
   past it. These n rows are what Affinity Pooling merges (groups chosen on, and means
   taken of, the LM input: the audio features summed with the blank token's embedding).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import torch

from .base import TARGET_SR, ReferenceSpeechLM, to_16k_mono

WHISPER_SUBFOLDER = "whisper-large-v3"
BLANK_ID = 151666  # <|im_kimia_text_blank|>, Kimi-Audio's audio placeholder
BLANK, AUDIO_BEGIN, AUDIO_END = "<|im_kimia_text_blank|>", "<|im_media_begin|>", "<|im_media_end|>"
USER_START, MSG_END = "<|im_kimia_user_msg_start|>", "<|im_msg_end|>"
ASSISTANT_START = "<|im_kimia_assistant_msg_start|>"
FRAMES_PER_TOKEN = 4  # encoder frames concatenated per adaptor row (12.5 Hz)
# Kimi-Audio's tiktoken pre-tokenizer pattern (its tokenizer's definition)
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def placeholder_count(frames: int) -> int:
    """Kimi-Audio's placeholders for ``frames`` mel frames: 13 per 100, then the remainder's."""
    rest = frames % 100
    c = (rest - 1) // 2 + 1
    c = ((c - 1) // 2 + 1 - 1) // 2 + 1
    return int(c + (frames // 100) * 13)


class ReferenceKimiAudio(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        import tiktoken
        from safetensors.torch import load_file
        from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        root = Path(model_dir)
        sub = root / WHISPER_SUBFOLDER
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(sub)
        encoder = WhisperEncoder(WhisperConfig.from_pretrained(sub))
        enc_state = {k[len("model.encoder."):]: v for k, v in _load_dir(sub, load_file).items()
                     if k.startswith("model.encoder.")}
        missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{sub}: Whisper encoder tensors missing {missing}, unexpected {unexpected}")
        self.encoder = encoder.to(dtype).eval()

        state = _load_dir(root, load_file)
        config = Qwen2Config.from_pretrained(model_dir)
        qwen2 = Qwen2ForCausalLM(config)
        lm_state = {k: v for k, v in state.items() if not k.startswith("model.vq_adaptor.")}
        missing, unexpected = qwen2.load_state_dict(lm_state, strict=False)
        tied = ["lm_head.weight"] if config.tie_word_embeddings else []
        if sorted(missing) != tied or unexpected:
            raise ValueError(f"{root}: decoder tensors missing {missing}, unexpected {unexpected}")
        qwen2.tie_weights()
        self.qwen2 = qwen2.to(dtype).eval()
        d_in = int(getattr(self.qwen2.config, "kimia_adaptor_input_dim", 4 * self.encoder.config.d_model))
        hidden = int(self.qwen2.config.hidden_size)
        self.adaptor = torch.nn.ModuleDict({
            "0": torch.nn.Linear(d_in, hidden), "3": torch.nn.Linear(hidden, hidden), "4": torch.nn.LayerNorm(hidden),
        })
        for idx, mod in self.adaptor.items():
            mod.load_state_dict({name: state[f"model.vq_adaptor.layers.{idx}.{name}"] for name in mod.state_dict()})
        self.adaptor = self.adaptor.to(dtype).eval()
        self.dtype = dtype
        # the parts as one module (tools find the encoder's layers by name: audio_tower.layers)
        self.model = torch.nn.ModuleDict({"audio_tower": self.encoder, "adaptor": self.adaptor,
                                          "language_model": self.qwen2})

        ranks = {}
        for line in (root / "tiktoken.model").read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        added = json.loads((root / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        specials = {v["content"]: int(k) for k, v in added.items()}
        self.tokenizer = tiktoken.Encoding(name="kimi-ref", pat_str=PAT_STR, mergeable_ranks=ranks,
                                           special_tokens=specials)
        self.audio_token_id = BLANK_ID

    def chat_prompt(self, question: str) -> str:
        """One user turn [audio, question] in Kimi-Audio's layout (what its chat template renders)."""
        return (f"{USER_START}{AUDIO_BEGIN}{BLANK}{AUDIO_END}\n{question}{MSG_END}{ASSISTANT_START}")

    # -- the base class's view ------------------------------------------------------------
    @property
    def language_model(self):
        return self.qwen2.model

    @property
    def lm_head(self):
        return self.qwen2.lm_head

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, allowed_special="all")

    # -- audio path -------------------------------------------------------------------------
    def features(self, wave: np.ndarray) -> torch.Tensor:
        """(128, T) log-mel of one 16 kHz wave, as Kimi-Audio's processor computes it."""
        hop = self.feature_extractor.hop_length
        if wave.shape[0] % hop:
            wave = np.pad(wave, (0, hop - wave.shape[0] % hop))
        fe = self.feature_extractor([wave], sampling_rate=TARGET_SR, padding="longest",
                                    return_attention_mask=True, return_tensors="pt")
        frames = int(fe["attention_mask"].sum())
        return fe["input_features"][0, :, :frames].to(self.dtype)

    @torch.no_grad()
    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Whisper encoder + 4-frame concatenation + VQ adaptor: (m, hidden)."""
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(feats[None]))
        x = torch.nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        x = enc.layer_norm(x)[0]
        pad = (-x.shape[0]) % FRAMES_PER_TOKEN
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(-1, FRAMES_PER_TOKEN * x.shape[-1])
        a = self.adaptor
        return a["4"](a["3"](torch.nn.functional.gelu(a["0"](x))))

    @torch.no_grad()
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]], **kw) -> list[torch.Tensor]:
        """The n LM-input rows of each audio's placeholders (the fused sum; see the module doc)."""
        blank = self.language_model.get_input_embeddings()(torch.tensor([BLANK_ID]))[0]
        out = []
        for wave, sr in audios:
            feats = self.features(to_16k_mono(wave, sr))
            audio = self.encode(feats).to(blank.dtype)
            n = placeholder_count(int(feats.shape[-1]))
            used = min(n, audio.shape[0])
            rows = blank.expand(n, -1).clone()
            rows[:used] = (audio[:used] + blank) * math.sqrt(2)
            out.append(rows)
        return out

    def num_audio_tokens(self, n_samples: int) -> int:
        hop = self.feature_extractor.hop_length
        return placeholder_count(min(-(-int(n_samples) // hop), self.feature_extractor.nb_max_frames))


def _load_dir(path: Path, load_file) -> dict:
    state: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
