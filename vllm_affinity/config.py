"""Validated configuration: presets, server SPEC, per-request overrides.

A SPEC is what the user types after ``"affinity":`` in the server flag
(``--hf-overrides '{"affinity": SPEC}'``):

* a preset name (``paper-aggressive``, ``paper-conservative``, ``off``, ...), the
  stem of a file in ``configs/``;
* a path to a YAML (or JSON) file holding an object like the presets;
* an object, e.g. ``{"input": {"keep_ratio": 0.74, "window": 1}}``.

A missing stage is off. Every error names the offending field.
No vLLM import here.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: key of the per-request override in ``mm_processor_kwargs``
REQUEST_KEEP_RATIO_KEY = "affinity_keep_ratio"
#: key of the SPEC in ``--hf-overrides`` (and thus on the HF config object)
HF_CONFIG_KEY = "affinity"
#: Qwen2-Audio's encoder window (seconds); longer audio is truncated or windowed
ENCODER_WINDOW_SECONDS = 30
#: longest audio accepted with ``long_audio: windows`` when ``max_audio_seconds`` is unset
DEFAULT_MAX_WINDOWED_SECONDS = 120.0


class AffinityConfigError(ValueError):
    """A SPEC or per-request value is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputStage(_Strict):
    """Pooling of the audio embeddings entering the LM (after encoder + projector)."""

    keep_ratio: float = Field(
        gt=0.0, le=1.0, description="fraction of each audio's tokens kept (exact-count mode)"
    )
    window: int = Field(1, ge=1, le=64, description="look-back window (omega) of the affinity score")
    method: Literal["affinity", "uniform"] = Field(
        "affinity", description="how groups are chosen: by affinity, or equal-size bins"
    )
    budget: Literal["fixed", "voiced"] = Field(
        "fixed", description="how many groups an audio gets: 'fixed' keep_ratio of its tokens; "
        "'voiced' keep_ratio of its voiced tokens (frame-energy VAD) + at most silence_groups "
        "for the rest (vllm_affinity/budget.py)"
    )
    silence_groups: int = Field(8, ge=0, le=4096, description="budget 'voiced': groups for the unvoiced tokens")
    voiced_db: float = Field(40.0, gt=0.0, le=120.0, description="budget 'voiced': a token is voiced "
                             "if its RMS is within this many dB of the audio's loudest token")
    kv_block_align: Literal["auto", "off", "keep_more", "keep_fewer"] = Field(
        "auto", description="round each audio's dropped-token count to a multiple of the KV block "
        "size, so the next turn of a chat (which repeats this prompt) recomputes the same uncached "
        "tail as stock: vLLM's prefix cache hits whole blocks. 'keep_more' rounds the drop down "
        "(at most block_size - 1 more tokens than keep_ratio gives, the same KV blocks saved), "
        "'keep_fewer' rounds it up (at most block_size - 1 fewer). 'auto' (default): 'keep_more' "
        "where vLLM's prefix caching is on (its default) on a decoder-only model, else 'off'. "
        "Explicit values: decoder-only models only"
    )
    size_weighted: bool = Field(
        False, description="attention that reads the merged rows weighs each by its group size: "
        "softmax(q.k/sqrt(d) + log size), exactly, via one extra head dimension padded to a head "
        "size the attention backend supports (more KV bytes per kept row; Whisper's cross-attention)"
    )

    @field_validator("keep_ratio", mode="before")
    @classmethod
    def _finite_number(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError("must be a finite number in (0, 1]")
        return v


def _resolve_merge_layer(merge_layer: int, num_layers: int, field: str, model: str, why: str) -> int:
    """``merge_layer`` (negative: from the end) as an absolute layer in [0, num_layers - 2]."""
    layer = merge_layer + num_layers if merge_layer < 0 else merge_layer
    if not 0 <= layer <= num_layers - 2:
        raise AffinityConfigError(
            f"invalid vllm-affinity config: {field} resolves to layer {layer}, but {model}: the merge "
            f"must apply to a layer in [0, {num_layers - 2}] (or [-{num_layers}, -2] from the end) {why}"
        )
    return layer


class DeepStage(_Strict):
    """Pooling of the audio hidden states after decoder layer ``merge_layer``.

    ``merge_layer`` is 0-based: the merge applies to the OUTPUT of decoder layer L;
    layers L+1.. compute on (and keep KV cache for) the merged sequence. Negative
    values count from the end (-3 is layer 29 of 32, the paper's choice), so a preset
    fits models of other depths. Valid: 0 <= L <= num_layers - 2 after resolving.
    ``keep_ratio`` is relative to the audio tokens that reach the deep stage.
    """

    merge_layer: int = Field(description="decoder layer whose output is merged (0-based; <0 from the end)")
    keep_ratio: float = Field(gt=0.0, le=1.0, description="fraction of each audio span kept at the deep stage")
    window: int = Field(3, ge=1, le=64, description="look-back window (omega) of the affinity score")
    method: Literal["affinity", "uniform"] = "affinity"
    size_weighted: bool = Field(
        False, description="the layers above the merge weigh each merged row by its group size: "
        "softmax(q.k/sqrt(d) + log size), exactly, via one extra head dimension padded to a head "
        "size the attention backend supports (more KV bytes per row in every layer: vLLM pads all "
        "KV pages to the largest)"
    )

    kv_block_align: Literal["auto", "off", "keep_more", "keep_fewer"] = Field(
        "auto", description="round each audio span's rows dropped at the deep merge to a multiple of "
        "the KV block size, so that past every span the deep layers' sequence and the prompt are "
        "congruent modulo the block size: a token-block boundary is then a deep-block boundary, and "
        "vLLM's prefix cache works (a chat's next turn hits the deep layers' blocks too). "
        "'keep_more' rounds the drop down (at most block_size - 1 more rows), 'keep_fewer' up. "
        "'auto' (default): 'keep_more' where vLLM's prefix caching is on (its default), 'off' where "
        "it is off. 'off' needs prefix caching off (--no-enable-prefix-caching): start-up refuses it "
        "otherwise"
    )

    _finite = field_validator("keep_ratio", mode="before")(InputStage._finite_number.__func__)

    def resolve_layer(self, num_layers: int) -> int:
        """The absolute merge layer for a model with ``num_layers`` decoder layers."""
        return _resolve_merge_layer(
            self.merge_layer, num_layers, f"deep.merge_layer={self.merge_layer}",
            f"this model has {num_layers} decoder layers",
            "so that at least one layer computes on the merged sequence")


class EncoderStage(_Strict):
    """Merging inside the audio encoder: after encoder layer ``merge_layer`` the frames of each
    audio are merged to ``num_kept(frames, keep_ratio)`` (exact count, fixed by the server SPEC
    so the processor knows every placeholder count); layers E+1.. of the encoder compute on the
    merged frames. The input stage, if on, then pools what the encoder left.

    ``merge_layer`` is 0-based, negative from the end; valid: 0 <= E <= encoder_layers - 2
    after resolving (checked against the model at start-up)."""

    merge_layer: int = Field(description="encoder layer whose output is merged (0-based; <0 from the end)")
    keep_ratio: float = Field(gt=0.0, le=1.0, description="fraction of each audio's encoder frames kept")
    window: int = Field(1, ge=1, le=64, description="look-back window (omega) of the affinity score")
    method: Literal["affinity", "uniform"] = "affinity"
    size_weighted: bool = Field(
        False, description="proportional attention in the encoder layers after the merge: every merged "
        "frame's key carries log(group size), softmax(q.k/sqrt(d) + log size), exactly (ToMe's "
        "proportional attention). A layer then computes on the merged frames what it computes on the "
        "full-length sequence in which every frame is replaced by its group's mean"
    )

    _finite = field_validator("keep_ratio", mode="before")(InputStage._finite_number.__func__)

    def resolve_layer(self, num_layers: int) -> int:
        """The absolute merge layer for an audio encoder of ``num_layers`` layers."""
        return _resolve_merge_layer(
            self.merge_layer, num_layers, f"encoder.merge_layer={self.merge_layer}",
            f"this model's audio encoder has {num_layers} layers",
            "so that at least one encoder layer computes on the merged frames")


class AffinityConfig(_Strict):
    """The whole plugin configuration. A stage that is None is off."""

    encoder: EncoderStage | None = None
    input: InputStage | None = None
    deep: DeepStage | None = None
    allow_request_override: bool = Field(
        True, description=f"accept mm_processor_kwargs.{REQUEST_KEEP_RATIO_KEY} per request"
    )
    min_request_keep_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="lowest per-request keep ratio a client may ask for"
    )
    max_request_keep_ratio: float = Field(
        1.0, gt=0.0, le=1.0, description="highest per-request keep ratio a client may ask for"
    )
    encoder_real_length: bool = Field(
        False, description="run the audio encoder on the real audio length (+ the convolutions' "
        "margin) instead of the whole 30 s window; outputs equal up to float rounding"
    )
    long_audio: Literal["truncate", "windows"] = Field(
        "truncate", description="audio over the encoder's 30 s window: 'truncate' keeps the "
        "first 30 s (logged warning, stock behaviour); 'windows' encodes consecutive 30 s "
        "windows and concatenates their embeddings before pooling"
    )
    max_audio_seconds: float | None = Field(
        None, gt=0.0, description="reject longer audio with HTTP 400. Default: no limit with "
        f"long_audio=truncate; {DEFAULT_MAX_WINDOWED_SECONDS:g} s with long_audio=windows (it "
        "sizes vLLM's encoder-cache budget, so it is always finite there)"
    )

    @model_validator(mode="after")
    def _encoder_stage_composes(self):
        if self.encoder is not None and self.input is not None and self.input.budget != "fixed":
            raise ValueError("input.budget must be 'fixed' with an encoder stage (the voiced budget counts "
                             "waveform frames, which the encoder stage has already merged)")
        return self

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_request_keep_ratio > self.max_request_keep_ratio:
            raise ValueError(
                f"min_request_keep_ratio ({self.min_request_keep_ratio}) must not exceed "
                f"max_request_keep_ratio ({self.max_request_keep_ratio})"
            )
        return self

    def with_block_align(self, *, prefix_caching: bool, prompt_holds_audio: bool) -> "AffinityConfig":
        """This config with ``kv_block_align: auto`` resolved for an engine (the config hook
        calls it once; every process then reads the resolved SPEC): 'keep_more' where vLLM's
        prefix caching is on and the prompt holds the audio (decoder-only models), else 'off'.

        Why 'keep_more' by default: without it a chat's next turn recomputes up to a block
        more than stock per audio (input stage), or all of the deep layers past the first
        audio (deep stage); measured in docs/results.md (issue 21)."""
        update = {}
        for name in ("input", "deep"):
            stage = getattr(self, name)
            if stage is not None and stage.kv_block_align == "auto":
                align = "keep_more" if prefix_caching and prompt_holds_audio else "off"
                update[name] = stage.model_copy(update={"kv_block_align": align})
        return self.model_copy(update=update) if update else self

    @property
    def enabled(self) -> bool:
        return self.input is not None or self.deep is not None or self.encoder is not None

    @property
    def audio_seconds_limit(self) -> float | None:
        """Longest audio accepted (None: any length, truncated to the encoder window)."""
        if self.max_audio_seconds is not None:
            return self.max_audio_seconds
        return DEFAULT_MAX_WINDOWED_SECONDS if self.long_audio == "windows" else None

    @property
    def native_audio_seconds_limit(self) -> float | None:
        """Longest audio accepted by an architecture whose processor windows long audio
        itself: ``max_audio_seconds``; unset, the stock processor's own limit, except with
        a deep stage, where one audio must fit one prefill step (then 120 s)."""
        if self.max_audio_seconds is not None:
            return self.max_audio_seconds
        return DEFAULT_MAX_WINDOWED_SECONDS if self.deep is not None else None

    def describe(self, *, real_length: bool = True, windows: bool = True) -> str:
        """One line for the start-up log; ``real_length`` / ``windows``: whether the
        architecture applies those switches (others log them as ignored)."""
        parts = []
        e = self.encoder
        if e is not None:
            parts.append(f"encoder stage: merge_layer={e.merge_layer}, keep_ratio={e.keep_ratio}, "
                         f"window={e.window}, method={e.method}"
                         + (", size-weighted (proportional) attention after the merge" if e.size_weighted else ""))
        s = self.input
        parts.append(
            "input stage off" if s is None
            else f"input stage: keep_ratio={s.keep_ratio}, window={s.window}, method={s.method}"
            + (f", budget voiced (+{s.silence_groups} silence groups, {s.voiced_db:g} dB)"
               if s.budget == "voiced" else "")
            + (", size-weighted attention" if s.size_weighted else "")
            + (_ALIGN_NOTE[s.kv_block_align].format(what="tokens", align=s.kv_block_align))
        )
        if self.encoder_real_length and real_length:
            parts.append("encoder on the real audio length")
        if self.long_audio == "windows" and windows:
            parts.append(
                f"audio over {ENCODER_WINDOW_SECONDS} s encoded in {ENCODER_WINDOW_SECONDS} s windows "
                f"(up to {self.audio_seconds_limit:g} s)"
            )
        d = self.deep
        parts.append(
            "deep stage off" if d is None
            else f"deep stage: merge_layer={d.merge_layer}, keep_ratio={d.keep_ratio}, "
            f"window={d.window}, method={d.method}" + (", size-weighted attention" if d.size_weighted else "")
            + (_ALIGN_NOTE[d.kv_block_align].format(what="rows", align=d.kv_block_align))
        )
        return "; ".join(parts)


#: how :meth:`AffinityConfig.describe` states a stage's ``kv_block_align``
_ALIGN_NOTE = {
    "off": "",
    "auto": ", dropped {what} aligned to the KV block where prefix caching is on ({align})",
    "keep_more": ", dropped {what} aligned to the KV block ({align})",
    "keep_fewer": ", dropped {what} aligned to the KV block ({align})",
}


def presets_dir() -> Path:
    """``configs/`` of the source tree (editable installs) or the packaged copy."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "presets"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("vllm_affinity presets not found (configs/ missing)")


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _format_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{where}.{loc}: {msg} (got {e.get('input')!r})")
    return "invalid vllm-affinity config: " + "; ".join(lines)


def _read_file(path: Path) -> Any:
    import yaml

    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def load_spec(spec: Any, where: str = "affinity") -> AffinityConfig:
    """Turn a SPEC (preset name, path, dict, existing config or None) into a config."""
    if spec is None:
        return AffinityConfig()
    if isinstance(spec, AffinityConfig):
        return spec
    if isinstance(spec, str):
        return _load_named(spec, where)
    if not isinstance(spec, dict):
        raise AffinityConfigError(
            f"invalid vllm-affinity config: {where} must be a preset name, a file path or an "
            f"object, got {type(spec).__name__}"
        )
    try:
        return AffinityConfig.model_validate(spec)
    except ValidationError as e:
        raise AffinityConfigError(_format_error(e, where)) from None


@lru_cache(maxsize=64)
def _load_named(spec: str, where: str) -> AffinityConfig:
    path = Path(spec).expanduser()
    if not (path.suffix in (".yaml", ".yml", ".json") or "/" in spec):
        path = presets_dir() / f"{spec}.yaml"
        if not path.is_file():
            raise AffinityConfigError(
                f"invalid vllm-affinity config: {where}: unknown preset {spec!r}; "
                f"presets: {', '.join(preset_names())}, or pass a YAML file path or an object"
            )
    elif not path.is_file():
        raise AffinityConfigError(f"invalid vllm-affinity config: {where}: file {spec!r} not found")
    data = _read_file(path)
    if data is None:
        data = {}
    return load_spec(data, where=f"{where}[{path.name}]")


def server_config(hf_config: Any) -> AffinityConfig:
    """The server SPEC carried on the HF config by ``--hf-overrides '{"affinity": SPEC}'``
    (the one channel both the API server's processor and the workers read)."""
    return load_spec(getattr(hf_config, HF_CONFIG_KEY, None), where=f"hf_overrides.{HF_CONFIG_KEY}")


def request_keep_ratio(cfg: AffinityConfig, mm_kwargs: dict[str, Any] | None) -> float:
    """Effective input keep ratio for one request (1.0 = input stage off).

    Raises AffinityConfigError naming ``mm_processor_kwargs.affinity_keep_ratio``
    when the override is malformed or not allowed by the server.
    """
    base = cfg.input.keep_ratio if cfg.input is not None else 1.0
    if not mm_kwargs or REQUEST_KEEP_RATIO_KEY not in mm_kwargs:
        return base
    v = mm_kwargs[REQUEST_KEEP_RATIO_KEY]
    field = f"mm_processor_kwargs.{REQUEST_KEEP_RATIO_KEY}"
    if not cfg.allow_request_override:
        raise AffinityConfigError(f"{field}: per-request overrides are disabled on this server")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AffinityConfigError(f"{field} must be a number in (0, 1], got {v!r}")
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise AffinityConfigError(f"{field} must be in (0, 1], got {v!r}")
    if not cfg.min_request_keep_ratio <= v <= cfg.max_request_keep_ratio:
        raise AffinityConfigError(
            f"{field}={v!r} is outside the range this server allows "
            f"[{cfg.min_request_keep_ratio}, {cfg.max_request_keep_ratio}]"
        )
    return float(v)
