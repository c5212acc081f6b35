"""The one offline speed harness: the workloads users pay for, stock vLLM at its defaults as
the baseline, every variant in its own engine process, one report.

A shape script (``bench_offline.py`` for Qwen2-Audio, ``bench_models.py`` for the other
architectures) describes the model (a :class:`Bench`: model dir, dtype, prompt, SPECs, the
baseline of each bucket, analytic columns) and calls :func:`run`. Everything below is written
once for every shape.

Workloads, per audio length (bucket) and variant, ``reps`` timed chats each, buckets
interleaved inside a rep, after one untimed warm-up chat per bucket:

* (a) **TTFT** of turn 1, from vLLM's own request timestamps (``RequestOutput.metrics``:
  ``first_token_latency``, from the request's arrival, so the multimodal processor, the
  encoder and the LM prefill are in it);
* (b) **decode time per output token**: ``(last_token_ts - first_token_ts) / (tokens - 1)``
  of the same turn-1 request, ``decode_tokens`` (>= 32) tokens with ``ignore_eos``;
* (c) **turn 2 of a chat that repeats turn 1's audio**: turn 1's prompt, a fixed assistant
  answer and a new user question, the same audio (same noise): TTFT of turn 2 and its
  ``num_cached_tokens`` (the prefix cache's part). With ``chat_answer="generated"`` the answer
  is turn 1's own output, token for token (what a chat client re-sends), so the blocks turn 1
  filled while answering are cached too;
* (d) **end-to-end latency of a typical request**: at the ``e2e_bucket`` (30 s) turn 1 asks
  for ``e2e_tokens`` (128) tokens; TTFT + decode time of that request.

Every turn 1 gets fresh 1e-4 noise, so no processor, encoder or prefix cache serves it; the
KV blocks each KV-cache group holds are read at turn 1's first token (the prefill's KV).

Engines: single-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) for every variant, stock
included: on these 2-core machines vLLM's default multi-process CPU engine pins compute to one
core, and single-process lets the harness read the scheduler's KV managers; the same for all.
The baseline, ``stock``, is vLLM with the plugin not loaded (``VLLM_PLUGINS=""``) and no engine
flag a plain-vLLM user would not set: torch.compile, prefix caching, chunked prefill at
vLLM's defaults. The only settings every variant gets are what the machine needs: dummy
weights, a KV budget (``kv_cache_memory_bytes``), ``max_model_len``, the audio limit per
prompt, and, where the bench says so (``machine_needs``), eager mode for all. Plugin variants
run at the plugin's own defaults (whatever its config hook sets). ``stock-eager-nopc`` is the
handicapped baseline older benchmarks used (eager, prefix caching off), kept as an extra row.
``stock`` runs again at the end (``stock (again)``) so drift shows. Each variant's effective
engine flags (compile mode, eager, prefix caching, async scheduling, chunked prefill) are read
from the engine's config and written into the result files, with the CPU and command line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.common import CACHE, cpu_line, run_measured

#: the stock variants: the plugin not loaded; engine overrides
STOCK_VARIANTS = {
    "stock": {},
    "stock-eager-nopc": {"enforce_eager": True, "enable_prefix_caching": False},
    # stock with 32-token KV blocks (vLLM's CPU default is 128, its GPU default 16): an extra row
    # showing what the block size alone does to stock
    "stock-bs32": {"block_size": 32},
}
#: a plugin variant named ``<spec>-nopc`` runs with ``enable_prefix_caching=False`` (what a user
#: serving single turns may choose: kv_block_align 'auto' then keeps the exact keep_ratio)
NO_PREFIX_CACHING = "-nopc"
#: a plugin variant named ``<spec>-bs32`` runs with 32-token KV blocks (``--block-size 32``)
BLOCK_SIZE_32 = "-bs32"
#: what a chat client re-sends as turn 1's answer, and the follow-up question
ANSWER = "The speaker reads a short passage about the weather."
FOLLOW_UP = "Summarize it in one sentence."
WORKLOADS = ("ttft", "decode", "turn2", "e2e")
WORKLOAD_TITLES = {"ttft": "(a) TTFT", "decode": "(b) decode per token", "turn2": "(c) turn-2 TTFT",
                   "e2e": "(d) end-to-end"}


def chat_turn2(prompt: str) -> str:
    """Turn 2 of a Qwen-style chat (ChatML: every adapted architecture's template) whose
    turn 1 was ``prompt``: turn 1 verbatim (audio placeholder included), the answer, a new
    user question. The audio of turn 1 is sent again, as OpenAI-style clients do."""
    return f"{prompt}{ANSWER}<|im_end|>\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Bench:
    stem: str  # results/<stem>.{json,md}
    title: str
    model: Path
    dtype: str
    prompt: str  # turn 1, one audio placeholder
    specs: dict  # variant -> SPEC (None for the stock variants)
    baseline: Callable[[float], str] = lambda secs: "stock"
    extras: Callable[[str, float, dict], dict] | None = None  # (variant, bucket, measured row) -> columns
    limit_mm: dict = field(default_factory=lambda: {"audio": 1})
    max_model_len: int = 4096
    kv_bytes: int = 512 << 20
    machine_needs: dict = field(default_factory=dict)  # engine flags every variant gets, with why
    machine_needs_why: str = ""
    notes: list = field(default_factory=list)


# -- one engine process --------------------------------------------------------------------
def effective_flags(vc) -> dict:
    """What the engine actually runs with (after the platform's and the plugin's hooks)."""
    comp, sched = vc.compilation_config, vc.scheduler_config
    return {
        "compile_mode": str(getattr(comp.mode, "name", comp.mode)),
        "cudagraph_mode": str(getattr(comp.cudagraph_mode, "name", comp.cudagraph_mode)),
        "enforce_eager": bool(vc.model_config.enforce_eager),
        "prefix_caching": bool(vc.cache_config.enable_prefix_caching),
        "async_scheduling": bool(sched.async_scheduling),
        "chunked_prefill": bool(sched.enable_chunked_prefill),
        "disable_chunked_mm_input": bool(sched.disable_chunked_mm_input),
        "max_num_batched_tokens": int(sched.max_num_batched_tokens),
        "block_size": int(vc.cache_config.block_size),
        "scheduler_cls": str(sched.scheduler_cls),
        "worker_cls": str(vc.parallel_config.worker_cls),
    }


def worker(job_path: str) -> None:
    import resource

    import numpy as np
    import soundfile as sf
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    t_load = time.perf_counter()
    kw = dict(dtype=job["dtype"], load_format="dummy", max_model_len=job["max_model_len"],
              kv_cache_memory_bytes=job["kv_bytes"], limit_mm_per_prompt=job["limit_mm"],
              disable_log_stats=False,  # RequestOutput.metrics: vLLM's own request timestamps
              **job["engine"])
    if job["spec"] is not None:
        kw["hf_overrides"] = {"affinity": job["spec"]}
    llm = LLM(job["model"], **kw)
    load_s = time.perf_counter() - t_load
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    groups = kvm.kv_cache_config.kv_cache_groups
    page_per_group = [g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups]
    rng = np.random.default_rng(job["seed"])
    turn2 = chat_turn2(job["prompt"])
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode(job["prompt"], add_special_tokens=False)
    follow_ids = tok.encode(turn2[len(job["prompt"]) + len(ANSWER):], add_special_tokens=False)

    def request(rid: str, prompt, audio, max_tokens: int, read_kv: bool) -> dict:
        text = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        engine.add_request(rid, {**text, "multi_modal_data": {"audio": audio}},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        blocks, final = None, None
        while final is None:
            for o in engine.step():
                if o.request_id != rid:
                    continue
                if blocks is None and read_kv and o.outputs and o.outputs[0].token_ids:
                    rid_int = next(r for r in scheduler.requests if r.startswith(rid))
                    blocks = [len(m.req_to_blocks.get(rid_int, [])) for m in kvm.coordinator.single_type_managers]
                if o.finished:
                    final = o
        m = final.metrics
        if m is None or not m.first_token_latency:
            raise RuntimeError("RequestOutput.metrics missing: vLLM's request timestamps are needed")
        n = len(final.outputs[0].token_ids)
        decode = (m.last_token_ts - m.first_token_ts) / (n - 1) if n > 1 else None
        out = {"ttft_s": m.first_token_latency, "decode_s_per_token": decode, "output_tokens": n,
               "e2e_s": m.first_token_latency + (m.last_token_ts - m.first_token_ts),
               "prompt_tokens": len(final.prompt_token_ids), "cached_tokens": final.num_cached_tokens or 0,
               "token_ids": list(final.outputs[0].token_ids)}
        if blocks is not None:
            out["kv_blocks_per_group"] = blocks
            out["kv_bytes"] = sum(b * p for b, p in zip(blocks, page_per_group))
        return out

    def chat(tag: str, wave, sr, secs: float, warmup: bool = False) -> dict:
        noisy = (wave + rng.normal(0, 1e-4, wave.shape).astype(np.float32), sr)
        tokens = 2 if warmup else job["e2e_tokens"] if secs == job["e2e_bucket"] else job["decode_tokens"]
        t1 = request(f"{tag}-t1", job["prompt"], noisy, tokens, read_kv=True)
        two = turn2
        if job.get("chat_answer") == "generated":  # turn 1's answer token for token, then the question
            two = prompt_ids + t1["token_ids"] + follow_ids
        t2 = request(f"{tag}-t2", two, noisy, 1, read_kv=False)
        t1.pop("token_ids"), t2.pop("token_ids")
        return {"turn1": t1, "turn2": t2}

    clips = {float(s): sf.read(p, dtype="float32") for s, p in job["clips"].items()}
    out = {"variant": job["variant"], "load_s": load_s, "flags": effective_flags(engine.vllm_config),
           "kv_groups": len(groups), "page_bytes_per_group": page_per_group, "warmup": {}, "buckets": {}}
    for secs, (wave, sr) in clips.items():  # one untimed short chat per bucket: first-call costs of every shape
        out["warmup"][str(secs)] = chat(f"w{secs:g}", wave, sr, secs, warmup=True)
        if not job["warmup_every_bucket"]:
            break
    for rep in range(job["reps"]):
        for secs, (wave, sr) in clips.items():
            out["buckets"].setdefault(str(secs), []).append(chat(f"b{secs:g}-{rep}", wave, sr, secs))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(job["out"]).write_text(json.dumps(out))


# -- driver --------------------------------------------------------------------------------
def variant_engine(bench: Bench, variant: str) -> tuple[dict, bool]:
    """(engine overrides, plugin loaded) of a variant; ``stock (again)`` is ``stock``."""
    base = variant.removesuffix(" (again)")
    if base in STOCK_VARIANTS:
        return {**bench.machine_needs, **STOCK_VARIANTS[base]}, False
    if base.endswith(NO_PREFIX_CACHING):  # the plugin's SPEC with vLLM's prefix caching off
        return {**bench.machine_needs, "enable_prefix_caching": False}, True
    if base.endswith(BLOCK_SIZE_32):
        return {**bench.machine_needs, "block_size": 32}, True
    return dict(bench.machine_needs), True


def run(bench: Bench, variants: list[str], buckets: list[float], clips: dict, *, reps: int, decode_tokens: int,
        e2e_bucket: float, e2e_tokens: int, cpu: dict, out_dir: Path, timeout_min: float, argv: list[str],
        warmup_every_bucket: bool = True, chat_answer: str = "fixed") -> dict:
    """Every variant in its own engine process, stock first and again at the end; the report."""
    from tqdm import tqdm

    if decode_tokens < 32 or e2e_tokens < 32:
        raise SystemExit("--decode-tokens and --e2e-tokens must be >= 32 (a decode time needs tokens to average)")
    order = ["stock", *[v for v in variants if v != "stock"], "stock (again)"]
    runs = []
    CACHE.mkdir(parents=True, exist_ok=True)
    for variant in tqdm(order, desc=f"{bench.stem}", unit="engine"):
        engine, plugin = variant_engine(bench, variant)
        base = variant.removesuffix(" (again)")
        stem = f"{bench.stem}-{base}" + ("-again" if base != variant else "")
        job_path, out_path, log_path = (CACHE / f"job-{stem}.json", CACHE / f"out-{stem}.json",
                                        CACHE / f"log-{stem}.txt")
        out_path.unlink(missing_ok=True)
        job_path.write_text(json.dumps({
            "variant": variant, "spec": bench.specs.get(base) if plugin else None, "model": str(bench.model),
            "dtype": bench.dtype, "engine": engine, "kv_bytes": bench.kv_bytes, "max_model_len": bench.max_model_len,
            "limit_mm": bench.limit_mm, "prompt": bench.prompt,
            "clips": {str(s): str(clips[s]) for s in buckets},
            "reps": reps, "decode_tokens": decode_tokens, "e2e_bucket": e2e_bucket, "e2e_tokens": e2e_tokens,
            "seed": len(runs), "out": str(out_path), "warmup_every_bucket": warmup_every_bucket,
            "chat_answer": chat_answer,
        }))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if not plugin:
            env["VLLM_PLUGINS"] = ""
        m = run_measured([sys.executable, "-m", "benchmarks.harness", str(job_path)], log_path, env,
                         timeout_min * 60)
        if m["rc"] != 0 or not out_path.exists():
            print(log_path.read_text()[-4000:], file=sys.stderr)
            why = f"timed out after {timeout_min:g} min" if m["rc"] == -9 else f"exit status {m['rc']}"
            raise SystemExit(f"{bench.stem} variant {variant} failed ({why}); log: {log_path}")
        run = {**json.loads(out_path.read_text()), **{k: v for k, v in m.items() if k != "rc"},
               "engine_overrides": engine, "plugin_loaded": plugin}
        runs.append(run)
        tqdm.write(f"{variant}: {m['wall_s']:.0f} s (engine start {run['load_s']:.0f} s), "
                   f"other processes used {m['other_cpu_per_s']:.2f} CPU; flags {run['flags']}")
    rows = aggregate(bench, runs, buckets, e2e_tokens)
    data = {"bench": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench).items()
                      if not callable(v)},
            "cpu": cpu, "command": " ".join(argv), "buckets": buckets, "reps": reps,
            "decode_tokens": decode_tokens, "e2e_bucket": e2e_bucket, "e2e_tokens": e2e_tokens,
            "warmup_every_bucket": warmup_every_bucket, "chat_answer": chat_answer, "rows": rows, "runs": runs}
    write(bench, data, out_dir)
    return data


def _stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def aggregate(bench: Bench, runs: list[dict], buckets: list[float], e2e_tokens: int) -> list[dict]:
    rows = []
    for secs in buckets:
        per = {}
        for r in runs:
            chats = r["buckets"][str(secs)]
            t1 = [c["turn1"] for c in chats]
            t2 = [c["turn2"] for c in chats]
            per[r["variant"]] = {
                "bucket_s": secs, "variant": r["variant"],
                "ttft": _stats([t["ttft_s"] for t in t1]),
                "decode": _stats([t["decode_s_per_token"] for t in t1]),
                "turn2": _stats([t["ttft_s"] for t in t2]),
                "e2e": _stats([t["e2e_s"] for t in t1]) if t1[0]["output_tokens"] == e2e_tokens else None,
                "output_tokens": t1[0]["output_tokens"],
                "prompt_tokens": t1[0]["prompt_tokens"], "turn2_prompt_tokens": t2[0]["prompt_tokens"],
                "turn2_cached_tokens": statistics.median(t["cached_tokens"] for t in t2),
                "turn1_cached_tokens": max(t["cached_tokens"] for t in t1),
                "kv_bytes": t1[0].get("kv_bytes"), "kv_blocks_per_group": t1[0].get("kv_blocks_per_group"),
                "block_size": (r.get("flags") or {}).get("block_size"),
                "prefix_caching": (r.get("flags") or {}).get("prefix_caching", True),
            }
        base_name = bench.baseline(secs)
        base = per.get(base_name)
        for variant, row in per.items():
            row["baseline"] = base_name
            if bench.extras:
                row.update(bench.extras(variant.removesuffix(" (again)"), secs, row))
            for w in WORKLOADS:
                b, v = (base or {}).get(w), row.get(w)
                row[f"{w}_speedup"] = b["median"] / v["median"] if b and v and not row.get("truncated") else None
            row["kv_ratio"] = (row["kv_bytes"] / base["kv_bytes"] if base and base.get("kv_bytes")
                               and row.get("kv_bytes") and not row.get("truncated") else None)
            rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------------
def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, fmt)


def _cell(s: dict | None, fmt: str, scale: float = 1.0) -> str:
    if not s:
        return "–"
    return f"{s['median'] * scale:{fmt}} [{s['min'] * scale:{fmt}}–{s['max'] * scale:{fmt}}]"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def write(bench: Bench, data: dict, out_dir: Path) -> None:
    from benchmarks.report import write_report

    rows, runs = data["rows"], data["runs"]
    extra_cols = sorted({k for r in rows for k in r.get("columns", {})}, key=lambda k: list(
        next(r for r in rows if k in r.get("columns", {}))["columns"]).index(k))
    header = ["audio", "variant", "(a) TTFT s", "×", "(b) decode ms/token", "×", "(c) turn-2 TTFT s", "×",
              "turn-2 cached / prompt tokens", "(d) end-to-end s", "×", "prompt tokens", *extra_cols,
              "KV MiB / request", "KV ×", "baseline"]
    table = []
    for r in rows:
        table.append([
            f"{r['bucket_s']:g} s", r["variant"] + (" (first 30 s only)" if r.get("truncated") else ""),
            _cell(r["ttft"], ".3f"), _x(r["ttft_speedup"]), _cell(r["decode"], ".1f", 1e3), _x(r["decode_speedup"]),
            _cell(r["turn2"], ".3f"), _x(r["turn2_speedup"]),
            f"{r['turn2_cached_tokens']:.0f} / {r['turn2_prompt_tokens']}",
            _cell(r["e2e"], ".2f") if r["output_tokens"] == data["e2e_tokens"] else "–",
            _x(r["e2e_speedup"]) if r["output_tokens"] == data["e2e_tokens"] else "–",
            str(r["prompt_tokens"]), *[str(r.get("columns", {}).get(c, "–")) for c in extra_cols],
            _f(r["kv_bytes"], ".2f", 2**-20), _x(r["kv_ratio"]), r["baseline"]])
    flags = ["| variant | plugin | compile mode | eager | prefix caching | async scheduling | chunked prefill "
             "| no chunk inside audio | max batched tokens | block size | engine start s | peak RSS GiB "
             "| other CPU | engine overrides |", "|" + "---|" * 14]
    for r in runs:
        fl = r["flags"]
        flags.append(f"| {r['variant']} | {'yes' if r['plugin_loaded'] else 'no'} | {fl['compile_mode']} "
                     f"| {fl['enforce_eager']} | {fl['prefix_caching']} | {fl['async_scheduling']} "
                     f"| {fl['chunked_prefill']} | {fl['disable_chunked_mm_input']} | {fl['max_num_batched_tokens']} "
                     f"| {fl['block_size']} | {r['load_s']:.0f} | {r['peak_rss_gib']:.1f} "
                     f"| {r['other_cpu_per_s']:.2f} | {json.dumps(r['engine_overrides']) or '{}'} |")
    verdict = verdict_table(rows, data)
    specs = "; ".join(f"`{v}`: `{json.dumps(s)}`" for v, s in bench.specs.items() if s is not None)
    busy = max(r["other_cpu_per_s"] for r in runs)
    footer = "\n".join([
        f"Medians [min–max] of {data['reps']} timed chats per cell (after one short warm-up chat "
        f"{'per bucket' if data['warmup_every_bucket'] else 'on the first bucket'}); "
        f"× = baseline median / variant median (> 1: faster than the baseline; for KV, variant / baseline). "
        f"(a), (b), (d) from turn 1 (fresh noise: no cache serves it), {data['decode_tokens']} output tokens "
        f"with ignore_eos, {data['e2e_tokens']} at the {data['e2e_bucket']:g} s bucket ((d) there only); "
        "(c) turn 2 repeats turn 1's audio (same noise) after "
        + ("turn 1's own answer, token for token" if data.get("chat_answer") == "generated" else "a fixed answer")
        + "; times from vLLM's request "
        "metrics. KV at turn 1's first token, from the engine's KV-cache managers.",
        f"{bench.title}: {bench.dtype}, dummy weights, single-process engine, KV budget "
        f"{bench.kv_bytes / 2**20:.0f} MiB, max_model_len {bench.max_model_len}."
        + (f" Every variant also gets {json.dumps(bench.machine_needs)}: {bench.machine_needs_why}"
           if bench.machine_needs else ""),
        *bench.notes,
        cpu_line(data["cpu"]) + ".",
        f"Command: `{data['command']}`.",
        "SPECs: " + specs + ".",
        *([f"WARNING: other processes used up to {busy:.2f} CPUs while an engine ran: rerun on an idle machine."]
          if busy > 0.25 else []),
        "",
        "## Effective engine flags (read from each engine's config)",
        "",
        *flags,
        "",
        "## Against the baseline, per workload (ratio per bucket; > 1 beats it)",
        "",
        verdict,
    ])
    write_report(out_dir, bench.stem, f"Workloads: {bench.title}", header, table, footer, data)
    print(footer)
    plot(bench, data, out_dir)


def verdict_table(rows: list[dict], data: dict) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | " + " | ".join(WORKLOAD_TITLES[w] for w in WORKLOADS) + " |", "|---|" + "---|" * 4]
    for v in variants:
        cells = []
        for w in WORKLOADS:
            parts = [f"{r['bucket_s']:g} s {r[f'{w}_speedup']:.2f}x" for r in rows
                     if r["variant"] == v and r.get(f"{w}_speedup") is not None
                     and (w != "e2e" or r["output_tokens"] == data["e2e_tokens"])]
            cells.append(", ".join(parts) or "–")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(bench: Bench, data: dict, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return
    rows = data["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (w, label) in zip(axes, (("ttft", "(a) TTFT"), ("decode", "(b) decode per token"),
                                     ("turn2", "(c) turn-2 TTFT"))):
        for v in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["variant"] == v and r.get(f"{w}_speedup")]
            if sel:
                ax.plot([r["bucket_s"] for r in sel], [r[f"{w}_speedup"] for r in sel], marker="o", label=v)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel("speed-up vs baseline (x)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{bench.title}: against stock vLLM at its defaults", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / f"{bench.stem}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    worker(sys.argv[1])
