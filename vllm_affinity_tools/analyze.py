"""``vllm-affinity analyze``: where this model's audio representations are redundant, on this audio.

    vllm-affinity analyze MODEL --audio DIR [--question TEXT] [--max-clips N] [--out analysis/]

For every audio-encoder layer, the LM's audio input (what the input stage pools) and every
decoder layer (at the audio positions; decoder-only models): the distribution of the cosine
similarity between adjacent audio hidden states (mean, 10/50/90th percentiles), and the share
of positions the paper's affinity scan (window 1) would keep at thresholds tau: a new group
starts where cos(x_t, x_{t-1}) <= tau, so kept = (1 + #{t: cos <= tau}) / n.

Where it runs, and why: in Hugging Face transformers (the project's references,
``vllm_affinity_tools.reference``, the same weights) with forward hooks on the encoder's and the
decoder's layers and the pooling hook of the reference at its identity. That is exact (no
pooling anywhere: every layer sees what stock computes) and simple: vLLM's compiled, paged
layers expose no per-layer hidden states. One prefill per clip; no generation.

Encoder layers are read on the first encoder window, over its speech frames only (50 per second
of audio on the Whisper-style encoders; packed encoders, which drop padding themselves, on all
their rows): the zero padding of a short clip's 30 s window is trivially redundant and would
flatter every layer. Outputs under ``--out``: ``analysis.md``, ``analysis.json``, ``analysis.png``
(similarity by layer, the layers the stages can merge at marked).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

TAUS = (0.95, 0.9, 0.8, 0.7)
FRAMES_PER_SECOND = 50  # Whisper-style encoders after their stride-2 convolution
DEFAULT_QUESTION = "Transcribe the audio."

#: architecture -> reference class (vllm_affinity_tools.reference); Whisper has its own module
REFERENCES = {
    "Qwen2AudioForConditionalGeneration": "ReferenceQwen2Audio",
    "AudioFlamingo3ForConditionalGeneration": "ReferenceAudioFlamingo3",
    "GlmAsrForConditionalGeneration": "ReferenceGlmAsr",
    "Qwen3ASRForConditionalGeneration": "ReferenceQwen3Asr",
    "Qwen2_5OmniModel": "ReferenceQwen25Omni",
    "Qwen2_5OmniForConditionalGeneration": "ReferenceQwen25Omni",
    "Qwen3OmniMoeForConditionalGeneration": "ReferenceQwen3Omni",
    "MoonshotKimiaForCausalLM": "ReferenceKimiAudio",
}


@dataclass
class LayerStats:
    """Adjacent-cosine values of one layer, over all clips."""

    name: str
    kind: str  # encoder | input | decoder
    index: int
    values: list[float]
    positions: int = 0  # rows seen (sum over clips)
    groups_at: dict | None = None  # tau -> groups opened (sum over clips)

    def add(self, x) -> None:
        """``x``: (n, d) hidden states of one clip's audio, in order."""
        from vllm_affinity import pooling

        n = int(x.shape[0])
        if n < 2:
            return
        cos = pooling.neighbour_cosines(x, 1)[1:, 0]
        self.values.extend(cos.tolist())
        self.positions += n
        self.groups_at = self.groups_at or {t: 0 for t in TAUS}
        for t in TAUS:
            self.groups_at[t] += 1 + int((cos <= t).sum())

    def summary(self) -> dict:
        import numpy as np

        v = np.asarray(self.values, dtype=np.float64)
        q10, q50, q90 = (float(x) for x in np.percentile(v, [10, 50, 90]))
        return {"layer": self.name, "kind": self.kind, "index": self.index, "pairs": int(v.size),
                "cos_mean": float(v.mean()), "cos_p10": q10, "cos_p50": q50, "cos_p90": q90,
                "kept_at_tau": {f"{t:g}": self.groups_at[t] / self.positions for t in TAUS}}


def find_layer_lists(model, decoder_layers) -> list:
    """The audio encoder's layer list: the largest ModuleList named ``*layers`` under a module
    whose path names the audio tower or the encoder, other than the decoder's."""
    import torch

    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and mod is not decoder_layers:
            low = name.lower()
            if ("audio" in low or "encoder" in low) and "language_model" not in low and "text" not in low:
                found.append((name, mod))
    if not found:
        raise ValueError("no audio-encoder layer list found in the model")
    return max(found, key=lambda nm: len(nm[1]))


def _hook_outputs(layers, sink: list) -> list:
    from vllm_affinity_tools.reference.base import layer_out

    def hook(i):
        def fn(_module, _inp, out):
            sink.append((i, layer_out(out).detach()))
        return fn

    return [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


def _first_call(outputs: list) -> dict:
    """layer index -> its output at the first call, from the hooks' (index, output) records."""
    first: dict = {}
    for i, h in outputs:
        first.setdefault(i, h)
    return first


def _encoder_rows(h, seconds: float):
    """One clip's encoder-layer output as (n, d) speech rows (see the module docstring)."""
    if h.dim() == 3:
        h = h[0]
        return h[: max(2, min(h.shape[0], math.ceil(seconds * FRAMES_PER_SECOND)))]
    return h


def analyze(model_dir: str, clips: list[Path], question: str = DEFAULT_QUESTION, log=print) -> dict:
    import soundfile as sf
    import torch

    from vllm_affinity_tools.calibrate import model_facts

    facts, n_enc, n_dec, _ = model_facts(model_dir)
    stats: dict[str, LayerStats] = {}
    total_seconds = 0.0

    def stat(name, kind, index) -> LayerStats:
        return stats.setdefault(name, LayerStats(name, kind, index, []))

    whisper = facts.architecture == "WhisperForConditionalGeneration"
    with torch.no_grad():
        if whisper:
            from vllm_affinity_tools.reference.whisper import ReferenceWhisper

            ref = ReferenceWhisper(model_dir)
            enc_layers = ref.model.model.encoder.layers
            dec_layers = None
        else:
            from vllm_affinity_tools import reference

            ref = getattr(reference, REFERENCES[facts.architecture])(model_dir)
            dec_layers = ref.language_model.layers
            _, enc_layers = find_layer_lists(ref.model, dec_layers)
            prompt = chat_prompt(ref, question)
        for n, clip in enumerate(clips, 1):
            wave, sr = sf.read(str(clip), dtype="float32")
            seconds = len(wave) / sr
            total_seconds += seconds
            enc_out: list = []
            hooks = _hook_outputs(enc_layers, enc_out)
            try:
                if whisper:
                    lm_inputs = [_encoder_rows(ref.encode((wave, sr))[None], seconds)]
                    dec_out: list = []
                else:
                    lm_inputs, dec_out = [], []
                    hooks += _hook_outputs(dec_layers, dec_out)

                    def keep(e, _sink=lm_inputs):  # the reference's pooling hook, at identity
                        _sink.append(e)
                        return e

                    out = ref.generate(prompt, [(wave, sr)], max_new_tokens=1, pool_fn=keep)
            finally:
                for h in hooks:
                    h.remove()
            # an encoder layer runs once per window / chunk batch: its first window
            for i, h in sorted(_first_call(enc_out).items()):
                stat(f"encoder {i}", "encoder", i).add(_encoder_rows(h, seconds))
            for e in lm_inputs:
                stat("LM input", "input", 0).add(e)
            if dec_out:
                ids = torch.tensor(out.prompt_token_ids)
                audio = (ids == ref.audio_token_id).nonzero().flatten()
                for i, h in _first_call(dec_out).items():  # the prefill, not the decode step
                    stat(f"decoder {i}", "decoder", i).add(h[0, audio])
            log(f"[analyze] {n}/{len(clips)} {clip.name} ({seconds:.1f} s)")
    rows = [s.summary() for s in stats.values() if s.positions]
    order = {"encoder": 0, "input": 1, "decoder": 2}
    rows.sort(key=lambda r: (order[r["kind"]], r["index"]))
    return {"model": model_dir, "architecture": facts.architecture, "name": facts.name, "clips": len(clips),
            "audio_seconds": total_seconds, "layers": rows,
            "candidates": candidate_layers(facts, n_enc, n_dec)}


def chat_prompt(ref, question: str) -> str:
    """One user turn with one audio and ``question``, rendered by the model's chat template."""
    if hasattr(ref, "chat_prompt"):  # a reference without a transformers processor (Kimi-Audio)
        return ref.chat_prompt(question)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": question}]}]
    errors = []
    for owner in (ref.processor, getattr(ref.processor, "tokenizer", None)):
        if owner is None or not getattr(owner, "chat_template", None):
            continue
        try:
            return owner.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - processors differ; the tokenizer's template may render it
            errors.append(f"{type(owner).__name__}: {e}")
    raise ValueError("the model's chat template cannot render a user turn with one audio: "
                     + ("; ".join(errors) or "the checkpoint has no chat template"))


def candidate_layers(facts, n_enc: int | None, n_dec: int | None) -> dict:
    """The layers ``calibrate`` tries (vllm_affinity_tools.calibrate.plan_directions)."""
    from vllm_affinity_tools.calibrate import plan_directions

    out: dict[str, list[int]] = {"encoder": [], "deep": []}
    for d in plan_directions(facts, encoder_layers=n_enc, decoder_layers=n_dec, stages=("encoder", "deep")):
        p = d.points[0]
        out[p.stage].append(p.server[p.stage]["merge_layer"])
    return out


def write(result: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = ["layer", "adjacent cos mean", "p10", "p50", "p90", *(f"kept at τ={t:g}" for t in TAUS)]
    cand = result["candidates"]
    lines = [f"# vllm-affinity analyze: {result['name']} at `{result['model']}`", "",
             f"{result['clips']} clips, {result['audio_seconds'] / 60:.1f} min of audio. Cosine similarity of "
             "adjacent audio hidden states per layer, and the share of positions the affinity scan (window 1) "
             "keeps at threshold τ. Layers marked † are where calibrate tries the encoder stage (E) or the deep "
             "stage (L); 'LM input' is what the input stage pools.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["layers"]:
        mark = ((r["kind"] == "encoder" and r["index"] in cand["encoder"])
                or (r["kind"] == "decoder" and r["index"] in cand["deep"]) or r["kind"] == "input")
        lines.append("| " + " | ".join([r["layer"] + (" †" if mark else ""), f"{r['cos_mean']:.3f}",
                                         f"{r['cos_p10']:.3f}", f"{r['cos_p50']:.3f}", f"{r['cos_p90']:.3f}",
                                         *(f"{r['kept_at_tau'][f'{t:g}']:.0%}" for t in TAUS)]) + " |")
    lines += ["", f"Command: `{command}`", ""]
    (out / "analysis.md").write_text("\n".join(lines))
    (out / "analysis.json").write_text(json.dumps(result | {"command": command}, indent=2))
    plot(result, out / "analysis.png")


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["layers"]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.35), 4.2))
    ax.fill_between(xs, [r["cos_p10"] for r in rows], [r["cos_p90"] for r in rows], alpha=0.2, label="p10-p90")
    ax.plot(xs, [r["cos_mean"] for r in rows], marker="o", label="mean adjacent cos")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["kept_at_tau"]["0.8"] for r in rows], "g--", label="kept at τ=0.8")
    ax2.set_ylabel("kept at τ=0.8")
    ax2.set_ylim(0, 1.05)
    cand = result["candidates"]
    for x, r in zip(xs, rows):
        if (r["kind"] == "encoder" and r["index"] in cand["encoder"]) or (r["kind"] == "decoder" and r["index"]
                                                                          in cand["deep"]) or r["kind"] == "input":
            ax.axvline(x, color="red", lw=0.6, alpha=0.5)
    ax.set_xticks(xs, [r["layer"].replace("encoder ", "E").replace("decoder ", "L") for r in rows], rotation=90,
                  fontsize=7)
    ax.set_ylabel("cosine(x_t, x_t-1)")
    ax.set_title(f"{result['name']}: adjacent audio similarity by layer ({result['clips']} clips; red: stage layers)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    from vllm_affinity_tools.calibrate import save_figure

    save_figure(fig, ax, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-affinity analyze", description=(
        "Where a speech LM's audio representations are redundant on your audio: adjacent-state cosine "
        "similarity per encoder layer, at the LM input and per decoder layer, and the share an affinity scan "
        "keeps at a few thresholds. Writes analysis.md/.json/.png."))
    p.add_argument("model", help="model directory (a transformers checkpoint of an architecture vllm-affinity serves)")
    p.add_argument("--audio", type=Path, required=True, help="directory of audio clips (wav, flac, ogg, mp3)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="the text of the user turn (decoder-only models)")
    p.add_argument("--max-clips", type=int, default=50, help="use the first N clips (default 50)")
    p.add_argument("--out", type=Path, default=Path("analysis"), help="output directory (default ./analysis)")
    return p


def main(argv: list[str] | None = None) -> int:
    from vllm_affinity_tools.calibrate import audio_files

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    try:
        clips = audio_files(a.audio, a.max_clips)
        result = analyze(a.model, clips, a.question, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"vllm-affinity analyze: error: {e}", file=sys.stderr)
        return 2
    write(result, a.out, "vllm-affinity analyze " + " ".join(argv))
    print(f"[analyze] {a.out / 'analysis.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
