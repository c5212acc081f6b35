"""What every tiny random-weight checkpoint builder shares: :class:`TinyBuilder`.

A tiny builder module (``tiny.py`` for Qwen2-Audio, ``tiny_af3.py``, ``tiny_glmasr.py``,
``tiny_qwen3asr.py``, ``tiny_qwen25omni.py``, ``tiny_qwen3omni.py``) holds its
architecture's tokens, chat template, ``prompt()`` and config helpers, and one
:class:`TinyBuilder` subclass: class attributes for what is data (special tokens, the
transformers class names, front-end gains, how to sharpen, what reloads), methods for the
steps that differ. ``TinyBuilder._build`` runs the steps, once for all:

1. check the shapes and create the output folder (:func:`prepare_out`, then the hook
   ``check_shape``);
2. ``tokenizer(s)``: by default a byte-level BPE trained offline on a small corpus
   (:func:`build_tokenizer`) with the builder's special tokens, reloaded with its ``roles``
   registered (:func:`build_tokenizer_with_roles`) where it has any;
3. ``processor(tokenizer, s)``: by default ``processor_class`` over a 128-bin Whisper
   feature extractor (:func:`whisper_processor`); ``ids(tokenizer)``: the :class:`Ids` every
   config needs (placeholder, eos, ``<|endoftext|>``, vocabulary size);
4. ``config(s, tokenizer, ids)``: the one hook every builder writes;
5. ``model(config, s)``: ``model_class`` seeded, float32 (:func:`init_model`); the audio
   front end amplified (``frontend_gain``, :func:`amplify_audio_frontend`); the text
   attention sharpened (:func:`sharpen_qk` on ``text_model``, ``qk_norm``);
6. ``save(out, model, config, processor, ids)``: the tensors under the names vLLM loads
   (hook ``saved_name``; default the Qwen2-Audio hub layout), the config, the processor and
   a greedy generation config (:func:`save_checkpoint`);
7. with ``verify``, transformers reloads the checkpoint cleanly (``reload``, ``tied``:
   :meth:`TinyBuilder.check_reload` over :func:`check_reload`).

``s`` is a namespace of ``build()``'s keywords, declared with their defaults in the
builder's ``defaults`` (most start from :data:`SHAPE`). The module ends with
``build, check_reload, main = Builder().api()``: ``build(out_dir, **keywords)`` with its
signature spelled out for ``help()`` / ``inspect``, and ``main`` the shared command line
(:func:`run_builder`: ``--layers --hidden --heads --kv-heads --seed --sharpen``, and
``--max-audio-len`` where ``defaults`` has it).

A builder whose tokenizer is not a ``tokenizers`` BPE (e.g. a tiktoken vocabulary file)
overrides ``tokenizer`` (return whatever its ``processor`` / ``ids`` / ``save`` need), ``ids``
(its ids may be fixed), ``processor`` (None: nothing saved for it) and extends ``save`` to
write its own files; a model that is not one transformers class overrides ``model``.

Random init makes attention nearly uniform, which hides position and pooling bugs
(logits move by 1e-5): every builder scales its text layers' q/k projections (``sharpen``,
default 8) so that attention is sharp and such bugs move logits by >= 1e-3; a decoder with
per-head q/k RMSNorm (Qwen3) scales the norms instead (``qk_norm``), as a projection scale
would be normalised away.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

# the keyword defaults most builders' build() take (Qwen2-Audio's are smaller)
SHAPE = dict(
    layers=4, hidden=256, heads=4, kv_heads=2, seed=0, sharpen=8.0,
    audio_layers=2, audio_d_model=128, audio_heads=2, vocab_size=512,
)

EOT_TOKEN = "<|endoftext|>"  # bos and pad of every builder's text model
QWEN_TOKENS = [EOT_TOKEN, "<|im_start|>", "<|im_end|>"]  # Qwen's chat role tokens

# the names transformers' Qwen processors read from ``extra_special_tokens``, in the order
# :func:`token_roles` takes the tokens
ROLE_NAMES = (
    "audio_token", "audio_bos_token", "audio_eos_token",
    "image_token", "video_token", "vision_bos_token", "vision_eos_token",
)

# content parts in vLLM's (``{"type": "audio"}``) and transformers' (``{"type": "audio",
# "audio": ...}``) shapes; see part_test
_PART_TYPES = {
    "audio": ["audio", "audio_url", "input_audio"],
    "image": ["image", "image_url"],
    "video": ["video", "video_url"],
}

_CORPUS = """
the quick brown fox jumps over the lazy dog. what is said in the audio? please transcribe
the speech. a speech language model listens to audio and answers questions about it.
affinity pooling merges adjacent audio tokens whose hidden states are nearly identical.
one two three four five six seven eight nine ten. hello world, how are you today?
you are a helpful assistant. system user assistant. describe the sound. 0123456789
"""


# -- tokens, chat templates, prompts ------------------------------------------------------
def token_roles(*tokens: str) -> dict[str, str]:
    """``extra_special_tokens`` for transformers' Qwen processors: ``tokens`` in
    :data:`ROLE_NAMES` order (audio placeholder, audio begin, audio end[, image, video,
    vision begin, vision end])."""
    return dict(zip(ROLE_NAMES, tokens, strict=False))


def part_test(kind: str, var: str = "c") -> str:
    """The Jinja test that content part ``var`` is a ``kind`` part ("audio", "image" or
    "video") in vLLM's or transformers' shape."""
    return f"{var}['type'] in {_PART_TYPES[kind]!r} or '{kind}' in {var}"


def qwen_chat_template(parts: dict[str, str], system: str | None = None) -> str:
    """A chat template in Qwen's layout (``<|im_start|>ROLE\\n...<|im_end|>\\n``; a default
    system turn if ``system``): each content part of kind ``k`` in ``parts`` renders as
    ``parts[k]``, text as is. Written as an explicit loop over ``message['content']`` so vLLM
    detects the "openai" content format and leaves the parts to the template."""
    head = "{% for m in messages %}"
    if system is not None:
        head += "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
    branches = "".join(
        "{% " + ("elif " if i else "if ") + part_test(kind) + " %}" + text for i, (kind, text) in enumerate(parts.items())
    )
    return (
        head + "<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}" + branches + "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def qwen_prompt(user: str, system: str | None = None) -> str:
    """One rendered user turn in Qwen's layout (a system turn first if ``system``), the
    assistant's turn opened."""
    head = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def build_tokenizer(vocab_size: int, special_tokens: list[str], chat_template: str, eos_token: str = "<|im_end|>"):
    """Byte-level BPE over a small built-in corpus with ``special_tokens`` (the first is the
    pad token; ``eos_token`` must be among them), ``vocab_size`` tokens in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(special_tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=special_tokens[0],
        unk_token=None,
        bos_token=None,
        additional_special_tokens=special_tokens[1:],
    )
    fast.chat_template = chat_template
    return fast


def build_tokenizer_with_roles(vocab_size: int, *, special_tokens, chat_template: str, eos_token: str,
                               roles: dict[str, str]):
    """:func:`build_tokenizer`, reloaded with ``roles`` (e.g. ``{"audio_token": "<|AUDIO|>"}``)
    registered as ``extra_special_tokens``: the named attributes transformers' processors read
    (Qwen3-ASR, the Omni thinkers)."""
    import tempfile

    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer(vocab_size, special_tokens=special_tokens, chat_template=chat_template, eos_token=eos_token)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return PreTrainedTokenizerFast.from_pretrained(d, extra_special_tokens=roles)


class Ids(NamedTuple):
    """The token ids every config needs."""

    audio: int  # the audio placeholder
    eos: int
    eot: int  # <|endoftext|>: bos and pad
    vocab: int  # vocabulary size


def special_ids(
    tokenizer, audio_token: str, eos_token: str = "<|im_end|>", eot_token: str = EOT_TOKEN
) -> tuple[int, int, int, int]:
    """(audio placeholder id, eos id, ``eot_token`` id, vocab size)."""
    return (
        tokenizer.convert_tokens_to_ids(audio_token),
        tokenizer.convert_tokens_to_ids(eos_token),
        tokenizer.convert_tokens_to_ids(eot_token),
        len(tokenizer),
    )


# -- configs -----------------------------------------------------------------------------
def audio_encoder_config(model_type: str, layers: int, d_model: int, heads: int) -> dict:
    """A tiny Whisper-style audio encoder (128 mel bins, 1500 positions)."""
    return {
        "model_type": model_type,
        "num_mel_bins": 128,
        "encoder_layers": layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": d_model * 2,
        "d_model": d_model,
        "max_source_positions": 1500,
    }


def decoder_config(
    model_type: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int, **extra
) -> dict:
    """A tiny decoder text config: the keys every builder's shares (FFN 2 x hidden, 4096
    positions, ``<|endoftext|>`` as bos), plus ``extra``."""
    return {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": eot,
        "eos_token_id": eos,
        **extra,
    }


def qwen2_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, im_end: int) -> dict:
    """A tiny Qwen2 decoder."""
    return decoder_config(
        "qwen2", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=im_end,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )


# -- the steps ---------------------------------------------------------------------------
def prepare_out(
    out_dir: str | Path,
    hidden: int,
    heads: int,
    kv_heads: int,
    *,
    audio_d_model: int | None = None,
    audio_heads: int | None = None,
    max_audio_len: int | None = None,
) -> Path:
    """Validate the shapes (text head_dim, and the audio head_dim / ``max_audio_len``
    where given) and create ``out_dir``."""
    if hidden % heads or heads % kv_heads:
        raise ValueError("--hidden must be divisible by --heads, --heads by --kv-heads")
    if hidden // heads < 32:
        raise ValueError(f"head_dim = hidden / heads = {hidden // heads}; vLLM's CPU attention needs >= 32")
    if audio_heads is not None and (audio_d_model % audio_heads or audio_d_model // audio_heads < 32):
        raise ValueError("audio head_dim = audio_d_model / audio_heads must be an integer >= 32")
    if max_audio_len is not None and max_audio_len < 30:
        raise ValueError("max_audio_len must be >= 30 s (one window)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def whisper_processor(processor_cls, tokenizer, chat_template: str, *, attention_mask: bool = False,
                      chunk_length: int = 30, **kwargs):
    """``processor_cls`` over a 128-bin Whisper feature extractor of ``chunk_length``
    seconds (with the frame mask if ``attention_mask``); ``kwargs`` go to the processor."""
    from transformers import WhisperFeatureExtractor

    fe_kwargs = {"return_attention_mask": True} if attention_mask else {}
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=chunk_length, **fe_kwargs)
    return processor_cls(feature_extractor=fe, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def init_model(model_cls, config, seed: int):
    """``model_cls(config)`` in float32 eval mode, seeded; the config names the architecture."""
    import torch

    config.architectures = [model_cls.__name__]
    config.dtype = "float32"
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def amplify_audio_frontend(model, gains: dict[str, float]) -> None:
    """Multiply the weights of the audio encoder's convolution front end (``gains``: child
    module name of the ``audio_tower`` -> factor).

    Why: at random init (std 0.02) three or four stacked convolutions leave the audio
    content about 1e-3 of the encoder's sinusoidal positions, so every frame looks alike
    (adjacent cosines 0.94-0.96 on the tiny Qwen3-ASR) and the exact-count cut points are
    fp32 ties (:func:`vllm_affinity.pooling.cut_margin` 2e-7): vLLM and the reference then
    pick different groups by rounding, on one CPU and not another. With the gain the
    audio sets the frames (median cosine ~0.7) and the margins of the test clips are
    >= 1e-4 (``tests/test_adapters.py::test_checkpoint_cut_points_are_not_ties``)."""
    import torch

    towers = [m for name, m in model.named_modules() if name.endswith("audio_tower")]
    if len(towers) != 1:
        raise RuntimeError(f"expected one audio_tower in {type(model).__name__}, found {len(towers)}")
    with torch.no_grad():
        for name, gain in gains.items():
            getattr(towers[0], name).weight.mul_(gain)


def sharpen_qk(text_model, factor: float, *, norms: bool = False) -> None:
    """Scale every layer's q and k projections of ``text_model`` by ``factor`` (sharp
    attention makes small errors show in logits), or with ``norms`` its per-head q/k
    RMSNorm weights, which would undo a projection scale."""
    import torch

    names = ("q_norm", "k_norm") if norms else ("q_proj", "k_proj")
    with torch.no_grad():
        for layer in text_model.layers:
            for name in names:
                getattr(layer.self_attn, name).weight.mul_(factor)


def _hub_name(name: str) -> str:
    """Map transformers-5 parameter names to the hub layout that vLLM loads (Qwen2-Audio's,
    shared by AudioFlamingo3 and GLM-ASR)."""
    for old, new in (
        ("model.audio_tower.", "audio_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"unexpected parameter name {name!r}")


def thinker_name(name: str) -> str:
    """transformers' own names of an Omni model (``thinker.*``), which are the hub's."""
    if not name.startswith("thinker."):
        raise ValueError(f"unexpected parameter name {name!r}")
    return name


def save_checkpoint(state: dict, config, processor, out: Path, *, eot: int, eos: int, saved_name=_hub_name) -> None:
    """Write the tensors of ``state`` under ``saved_name(name)`` (None: left out, e.g. a tied
    ``lm_head``), the config, the processor (if any) and a greedy generation config."""
    from safetensors.torch import save_file

    tensors = {saved_name(k): v.contiguous() for k, v in state.items()}
    tensors.pop(None, None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    gen = {"eos_token_id": eos, "pad_token_id": eot, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def sharpen_and_save(
    model, config, processor, out: Path, *, sharpen: float, eot: int, im_end: int, hub_name=None
) -> None:
    """:func:`sharpen_qk` on ``model.model.language_model`` then :func:`save_checkpoint`, for
    a builder not written as a :class:`TinyBuilder`."""
    sharpen_qk(model.model.language_model, sharpen)
    save_checkpoint(model.state_dict(), config, processor, out, eot=eot, eos=im_end, saved_name=hub_name or _hub_name)


def check_reload(model_cls, model_dir: str | Path, expected: dict | None = None, *, tied: tuple[str, str] | None = None) -> None:
    """transformers reloads ``model_dir`` as ``model_cls`` with no missing, unexpected or
    mismatched keys (and, given ``expected``, the very same tensors; given ``tied``, a
    pair of names whose reloaded tensors must be equal, e.g. lm_head and embeddings)."""
    import torch

    model, info = model_cls.from_pretrained(str(model_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"transformers reload of {model_dir} is not clean: {bad}")
    got = model.state_dict()
    if tied is not None and not torch.equal(got[tied[0]], got[tied[1]]):
        raise RuntimeError("lm_head is not tied to the embeddings after reload")
    if expected is not None:
        if set(got) != set(expected):
            raise RuntimeError(f"reloaded keys differ: {sorted(set(got) ^ set(expected))[:10]}")
        for k, v in expected.items():
            if not torch.equal(got[k], v):
                raise RuntimeError(f"reloaded tensor {k} differs from the saved one")


# -- the command line --------------------------------------------------------------------
def builder_args(prog: str, description: str, hidden: int, max_audio_len: bool = False,
                 sharpen: float = 8.0, heads: int = 4, kv_heads: int = 2) -> argparse.ArgumentParser:
    """The command line every tiny builder shares (``--max-audio-len`` where asked)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharpen", type=float, default=sharpen, help=f"scale of text q/k weights (default {sharpen:g})")
    if max_audio_len:
        p.add_argument("--max-audio-len", type=int, default=60, help="seconds per audio, multiple of 30 (default 60)")
    return p


def shape_kwargs(a: argparse.Namespace) -> dict:
    return dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, seed=a.seed, sharpen=a.sharpen)


def run_builder(
    build, name: str, prog: str, doc: str, *, hidden: int, max_audio_len: bool = False, argv: list[str] | None = None,
    sharpen: float = 8.0, heads: int = 4, kv_heads: int = 2,
) -> None:
    """A tiny builder's command line: parse :func:`builder_args`, ``build``, say where."""
    a = builder_args(prog, doc.split("\n\n")[0], hidden=hidden, max_audio_len=max_audio_len,
                     sharpen=sharpen, heads=heads, kv_heads=kv_heads).parse_args(argv)
    extra = {"max_audio_len": a.max_audio_len} if max_audio_len else {}
    out = build(a.out_dir, **shape_kwargs(a), **extra)
    print(f"tiny {name} written to {out}")


# -- the builder -------------------------------------------------------------------------
class TinyBuilder:
    """One architecture's tiny builder: class attributes for what is data, methods for the
    steps that differ (see the module docstring for the order). Subclasses set at least
    ``name``, ``defaults``, ``special_tokens``, ``chat_template``, ``audio_token``,
    ``model_class`` and ``processor_class`` (transformers class names, imported when
    building) and write :meth:`config`."""

    name: str  # printed by the command line ("tiny NAME written to ...")
    # build()'s keywords beyond out_dir, with their defaults (the shape, arch-specific
    # extras such as max_audio_len or experts, and verify where reload is set)
    defaults: dict
    special_tokens: list[str]
    chat_template: str
    audio_token: str
    eos_token: str = "<|im_end|>"
    eot_token: str = EOT_TOKEN
    roles: dict[str, str] | None = None  # extra_special_tokens of the tokenizer (token_roles)
    model_class: str
    processor_class: str
    frontend_gain: dict[str, float] | None = None  # see amplify_audio_frontend
    text_model: str = "model.language_model"  # attribute path of the decoder that is sharpened
    qk_norm: bool = False  # sharpen q_norm / k_norm instead of q_proj / k_proj
    # check_reload: (transformers class name, prefix stripped from the expected names) pairs;
    # None: the model class, all names
    reload: tuple[tuple[str, str], ...] | None = None
    tied: tuple[str, str] | None = None  # names whose reloaded tensors must be equal

    # -- hooks ---------------------------------------------------------------------------
    def tokenizer(self, s: SimpleNamespace):
        if self.roles:
            return build_tokenizer_with_roles(
                s.vocab_size, special_tokens=self.special_tokens, chat_template=self.chat_template,
                eos_token=self.eos_token, roles=self.roles,
            )
        return build_tokenizer(s.vocab_size, self.special_tokens, self.chat_template, self.eos_token)

    def processor(self, tokenizer, s: SimpleNamespace):
        """``processor_class`` over a 128-bin, 30 s Whisper feature extractor; a builder with
        ``max_audio_len`` (AF3, GLM-ASR) caps each audio there, with the frame mask and the
        placeholder named."""
        kwargs = {}
        if hasattr(s, "max_audio_len"):
            kwargs = dict(attention_mask=True, audio_token=self.audio_token, max_audio_len=s.max_audio_len)
        return whisper_processor(_transformers(self.processor_class), tokenizer, self.chat_template, **kwargs)

    def ids(self, tokenizer) -> Ids:
        return Ids(*special_ids(tokenizer, self.audio_token, self.eos_token, self.eot_token))

    def check_shape(self, s: SimpleNamespace) -> None:
        """Architecture-specific shape checks, after :func:`prepare_out`'s."""

    def config(self, s: SimpleNamespace, tokenizer, ids: Ids):
        """The transformers config of the model (``s``: build()'s keywords)."""
        raise NotImplementedError

    def model(self, config, s: SimpleNamespace):
        """The random-weight model: ``model_class`` seeded, float32 (:func:`init_model`)."""
        return init_model(_transformers(self.model_class), config, s.seed)

    def saved_name(self, name: str) -> str | None:
        """The saved name of a transformers parameter (None: not saved)."""
        return _hub_name(name)

    def save(self, out: Path, model, config, processor, ids: Ids) -> None:
        """Write the checkpoint (:func:`save_checkpoint` under :meth:`saved_name`); a builder
        with files of its own (a tiktoken vocabulary, a sub-folder) extends it."""
        save_checkpoint(model.state_dict(), config, processor, out, eot=ids.eot, eos=ids.eos, saved_name=self.saved_name)

    # -- the steps -----------------------------------------------------------------------
    def _build(self, out_dir: str | Path, **kwargs) -> Path:
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise TypeError(f"build() got unexpected keyword arguments {sorted(unknown)}")
        s = SimpleNamespace(**{**self.defaults, **kwargs})
        out = prepare_out(
            out_dir, s.hidden, s.heads, s.kv_heads, audio_d_model=getattr(s, "audio_d_model", None),
            audio_heads=getattr(s, "audio_heads", None), max_audio_len=getattr(s, "max_audio_len", None),
        )
        self.check_shape(s)
        tokenizer = self.tokenizer(s)
        processor = self.processor(tokenizer, s)
        ids = self.ids(tokenizer)
        config = self.config(s, tokenizer, ids)
        model = self.model(config, s)
        if self.frontend_gain:
            amplify_audio_frontend(model, self.frontend_gain)
        sharpen_qk(attrgetter(self.text_model)(model), s.sharpen, norms=self.qk_norm)
        self.save(out, model, config, processor, ids)
        if getattr(s, "verify", False):
            self.check_reload(out, model.state_dict())
        return out

    def check_reload(self, model_dir: str | Path, expected: dict | None = None) -> None:
        """:func:`check_reload` as each class of ``reload`` (``expected``: the model's
        state dict as built, stripped of each class's prefix)."""
        for cls, prefix in self.reload or ((self.model_class, ""),):
            want = None if expected is None else {k.removeprefix(prefix): v for k, v in expected.items()}
            check_reload(_transformers(cls), model_dir, want, tied=self.tied)  # the module's function

    def main(self, argv: list[str] | None = None) -> None:
        module = sys.modules[type(self).__module__]
        spec = getattr(module, "__spec__", None)
        run_builder(
            self._build, self.name, f"python -m {spec.name if spec else module.__name__}", module.__doc__,
            hidden=self.defaults["hidden"], max_audio_len="max_audio_len" in self.defaults, argv=argv,
            sharpen=self.defaults["sharpen"], heads=self.defaults["heads"], kv_heads=self.defaults["kv_heads"],
        )

    def api(self):
        """``(build, check_reload, main)`` for the builder module; ``build`` with its keyword
        signature spelled out."""

        def build(out_dir, **kwargs):
            return self._build(out_dir, **kwargs)

        P = inspect.Parameter
        build.__signature__ = inspect.Signature(
            [P("out_dir", P.POSITIONAL_OR_KEYWORD, annotation="str | Path")]
            + [P(k, P.KEYWORD_ONLY, default=v, annotation=type(v).__name__) for k, v in self.defaults.items()],
            return_annotation="Path",
        )
        build.__module__ = type(self).__module__
        build.__doc__ = f"Build the tiny {self.name} checkpoint in ``out_dir`` (see the module docstring)."
        return build, self.check_reload, self.main


class OmniThinker(TinyBuilder):
    """An Omni model whose thinker is what vLLM serves: the text model sharpened is
    ``thinker.model``, the tensors are saved under transformers' own names (``thinker.*``,
    the hub's)."""

    text_model = "thinker.model"

    def saved_name(self, name: str) -> str:
        return thinker_name(name)


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)
