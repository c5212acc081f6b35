"""`vllm-affinity analyze` and `calibrate` (vllm_affinity_tools.analyze / .calibrate).

Pure parts first (answer comparison, the target, the search plan for every architecture, the
walk's stopping rule, inputs): no engine. Then the commands themselves: `analyze` on every
architecture's tiny checkpoint (transformers), `calibrate` through the real vLLM CPU engine on
the tiny Qwen2-Audio (chat prompts, input + deep stages, resumed from its cache) and on Whisper
tiny.en (encoder-decoder prompts, the encoder stage), and the recommended YAML served by a real
`vllm-affinity serve` answering the openai client with the prompt tokens calibrate counted.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from vllm_affinity import pooling
from vllm_affinity.architectures import ARCHITECTURES
from vllm_affinity.config import load_spec
from vllm_affinity_tools import calibrate as C

from .conftest import CACHE


# -- comparing answers ---------------------------------------------------------------------
def _ans(text, ids, lps=None):
    return {"text": text, "token_ids": ids, "logprobs": lps if lps is not None else [-0.1] * len(ids)}


def test_first_divergence_and_logprob_gap():
    assert C.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert C.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert C.first_divergence([1, 2], [1, 2, 3]) == 2
    assert C.first_divergence([], [4]) == 0
    assert C.logprob_gap([-1.0, -2.0, -3.0], [-1.5, -2.0, -9.0], 2) == pytest.approx(0.25)
    assert C.logprob_gap([-1.0], [-2.0], 0) is None


def test_compare_counts_what_moved():
    stock = [_ans("the cat sat", [1, 2, 3]), _ans("a dog ran far", [4, 5, 6, 7])]
    cand = [_ans("the cat sat", [1, 2, 3]), _ans("a dog sat far", [4, 5, 9, 7])]
    m = C.compare(stock, cand, bootstrap=200)
    assert m["answers"] == 2 and m["exact"] == 0.5
    assert m["divergence"] == pytest.approx(1 / 7)  # one substituted word of stock's seven
    assert m["token_edit_rate"] == pytest.approx(1 / 7)
    assert m["diverged_answers_first_token_median"] == 2
    assert 0.0 <= m["divergence_ci"][0] <= m["divergence"] <= m["divergence_ci"][1]
    refs = ["the cat sat", "a dog sat far"]
    m = C.compare(stock, cand, refs, bootstrap=200)
    assert m["stock_wer"] == pytest.approx(1 / 7) and m["wer"] == 0.0 and m["dwer"] == pytest.approx(-1 / 7)
    with pytest.raises(ValueError, match="2 stock answers for 1"):
        C.compare(stock, cand[:1])


@pytest.mark.parametrize("text, err", [("foo=1", "expected divergence"), ("divergence=x", "not a number"),
                                       ("dwer=-1", ">= 0"), ("divergence", "expected")])
def test_target_rejects_bad_values(text, err):
    with pytest.raises(ValueError, match=err):
        C.Target.parse(text)


def test_target_met():
    t = C.Target.parse("divergence=0.04")
    assert t.met({"divergence": 0.04}) and not t.met({"divergence": 0.0401})
    d = C.Target.parse("dwer=0.5")
    assert d.met({"dwer": 0.005, "divergence": 1.0}) and not d.met({"dwer": 0.0051, "divergence": 0.0})
    with pytest.raises(ValueError, match="needs --references"):
        d.met({"divergence": 0.0})


# -- the search plan --------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_planned_spec_is_valid_for_its_architecture(architecture):
    """The search never proposes a SPEC the server would refuse (32-layer encoder and decoder)."""
    facts = ARCHITECTURES[architecture]
    dirs = C.plan_directions(facts, encoder_layers=32, decoder_layers=None if not facts.deep_stage else 32,
                             stages=("input", "encoder", "deep"))
    stages = {p.stage for d in dirs for p in d.points}
    assert "input" in stages
    assert ("encoder" in stages) == facts.encoder_stage
    assert ("deep" in stages) == facts.deep_stage
    for d in dirs:
        for p in (*d.points, *([d.fallback] if d.fallback else [])):
            cfg = facts.validate(load_spec(p.spec()))
            if cfg.deep is not None:
                cfg.deep.resolve_layer(32)
            if cfg.encoder is not None:
                cfg.encoder.resolve_layer(32)
    if facts.encoder_stage:
        assert sorted(int(d.label.split("=")[1]) for d in dirs if d.label.startswith("encoder")) == [1, 16, 30]
    if facts.deep_stage:
        assert sorted(int(d.label.split("=")[1]) for d in dirs if d.label.startswith("deep")) == [16, 29]


def test_small_models_get_layers_they_have():
    facts = ARCHITECTURES["Qwen2AudioForConditionalGeneration"]
    dirs = C.plan_directions(facts, encoder_layers=2, decoder_layers=4, stages=("encoder", "deep"))
    assert [d.label for d in dirs] == ["encoder E=0", "deep L=1", "deep L=2"]


def _metrics(div, kv):
    return {"divergence": div, "kv_share": kv}


def test_walk_stops_a_direction_at_the_first_miss_and_tries_the_fallback():
    facts = ARCHITECTURES["WhisperForConditionalGeneration"]
    grid = C.Grid(input_ratios=(0.75, 0.5), encoder_ratios=(0.5, 0.34, 0.25), encoder_layers=(1, 2))
    dirs = C.plan_directions(facts, encoder_layers=4, decoder_layers=None, stages=("input", "encoder"), grid=grid)
    calls = []

    def evaluate(points):  # divergence grows as the ratio falls; merging at E=1 costs more
        calls.append([p.name for p in points])
        out = {}
        for p in points:
            spec = p.spec()
            r = spec["encoder"]["keep_ratio"] if "encoder" in spec else spec["input"]["keep_ratio"]
            penalty = 0.05 if spec.get("encoder", {}).get("merge_layer") == 1 else 0.0
            out[p.name] = _metrics(max(0.0, 0.5 - r) / 4 + penalty, r)
        return out

    results, notes = C.walk(dirs, evaluate, C.Target.parse("divergence=0.04"))
    # the input stage: one engine answers both ratios (and both size-weighting settings: 2 engines)
    assert calls[:2] == [["input 0.75", "input 0.5"], ["input 0.75 size-weighted", "input 0.5 size-weighted"]]
    # E=1 misses at 0.5: the gentler fallback 0.75 is tried, nothing more aggressive
    assert ["encoder E=1 0.5"] in calls and ["encoder E=1 0.75"] in calls and ["encoder E=1 0.34"] not in calls
    # E=2: 0.5 (0) and 0.34 (0.04) pass, 0.25 (0.0625) misses
    assert ["encoder E=2 0.25"] in calls
    assert any("E=1: stopped after encoder E=1 0.5" in n for n in notes)
    target = C.Target.parse("divergence=0.04")
    points = [p for d in dirs for p in (*d.points, *([d.fallback] if d.fallback else []))]
    combo = C.combine(points, results, target)
    # with the encoder stage, Whisper's input entry must keep its size weighting: the plain
    # input points are not eligible, the size-weighted 0.5 is (the exact SPECs evaluated, joined)
    assert combo.name == "encoder E=2 0.34 + input 0.5 size-weighted"
    assert combo.spec() == {"encoder": {"merge_layer": 2, "keep_ratio": 0.34, "size_weighted": True},
                            "input": {"keep_ratio": 0.5, "size_weighted": True}}
    best = C.recommend(points, results, target)
    assert best.name == "encoder E=2 0.34"  # least KV among the passing points
    assert C.pareto(points, results)[0] == "encoder E=2 0.25"


def test_walk_respects_the_time_budget():
    facts = ARCHITECTURES["Qwen2AudioForConditionalGeneration"]
    dirs = C.plan_directions(facts, encoder_layers=4, decoder_layers=8, stages=("input", "deep"))
    results, notes = C.walk(dirs, lambda ps: {p.name: _metrics(0, 1) for p in ps}, C.Target.parse("divergence=0"),
                            out_of_time=lambda: True)
    assert results == {} and all("time budget" in n for n in notes) and len(notes) == len(dirs)


def test_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        C.audio_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="no audio files"):
        C.audio_files(tmp_path)
    (tmp_path / "b.wav").write_bytes(b"")
    (tmp_path / "a.flac").write_bytes(b"")
    clips = C.audio_files(tmp_path)
    assert [c.name for c in clips] == ["a.flac", "b.wav"]
    refs = tmp_path / "refs.tsv"
    refs.write_text("a\tone two\nb.wav\tthree\n")
    assert C.read_references(refs, clips) == ["one two", "three"]
    refs.write_text("a\tone two\n")
    with pytest.raises(ValueError, match="no reference for b.wav"):
        C.read_references(refs, clips)
    refs.write_text("a one two\n")
    with pytest.raises(ValueError, match="refs.tsv:1: expected"):
        C.read_references(refs, clips)
    (tmp_path / "p.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        C.read_prompts(tmp_path / "p.txt")


def test_default_dtype_avoids_slow_bf16():
    dtype, why = C.default_dtype()
    flags = open("/proc/cpuinfo").read()
    import torch

    if torch.cuda.is_available() or "avx512_bf16" in flags or "amx_bf16" in flags:
        assert dtype == "auto"
    else:
        assert dtype == "float32" and "without native bf16" in why


def test_warnings_name_how_little_audio_there_is():
    t = C.Target.parse("divergence=0.04")
    w = C.warnings_for(40, 300.0, {"divergence_ci": [0.0, 0.1]}, t)
    assert any("only 40 answers" in x for x in w) and any("5.0 minutes" in x for x in w)
    assert any("interval reaches 10.0%" in x for x in w)
    assert C.warnings_for(120, 1200.0, {"divergence_ci": [0.0, 0.05]}, t) == []


# -- the commands on real checkpoints -----------------------------------------------------------
ANALYZE_MODELS = {
    "qwen2-audio": ("tiny", "tiny-qwen2-audio"),
    "af3": ("tiny_af3", "tiny-af3"),
    "glmasr": ("tiny_glmasr", "tiny-glmasr"),
    "qwen3asr": ("tiny_qwen3asr", "tiny-qwen3asr"),
    "qwen25omni": ("tiny_qwen25omni", "tiny-qwen25omni"),
    "qwen3omni": ("tiny_qwen3omni", "tiny-qwen3omni"),
    "kimi": ("tiny_kimi", "tiny-kimi"),
}


@pytest.fixture(scope="module")
def audio_dir(clips, tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    for c in clips[:2]:  # 2 s and 5 s
        shutil.copy(c, d / c.name)
    return d


def _tiny(builder: str, name: str):
    import importlib

    path = CACHE / name
    if not (path / "model.safetensors").exists():
        importlib.import_module(f"vllm_affinity_tools.{builder}").build(path)
    return path


@pytest.mark.parametrize("name", list(ANALYZE_MODELS))
def test_analyze_every_decoder_only_architecture(name, audio_dir, tmp_path):
    from vllm_affinity_tools import analyze

    model = _tiny(*ANALYZE_MODELS[name])
    assert analyze.main([str(model), "--audio", str(audio_dir), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "analysis.json").read_text())
    kinds = [r["kind"] for r in res["layers"]]
    cfg = json.loads((model / "config.json").read_text())
    text = cfg.get("thinker_config", cfg).get("text_config", cfg)
    assert kinds.count("decoder") == text["num_hidden_layers"] and kinds.count("input") == 1
    assert kinds.count("encoder") >= 1 and kinds == sorted(kinds, key=["encoder", "input", "decoder"].index)
    for r in res["layers"]:
        assert -1.0 <= r["cos_p10"] <= r["cos_p50"] <= r["cos_p90"] <= 1.0
        kept = [r["kept_at_tau"][k] for k in ("0.95", "0.9", "0.8", "0.7")]
        assert kept == sorted(kept, reverse=True) and 0 < kept[-1] <= 1  # lower tau: more merged
    # the LM input row counts exactly the audio tokens stock vLLM gives these clips
    lm = next(r for r in res["layers"] if r["kind"] == "input")
    assert lm["pairs"] == sum(r["pairs"] for r in res["layers"] if r["layer"] == "decoder 0")
    assert (tmp_path / "analysis.png").stat().st_size > 0 and "| LM input †" in (tmp_path / "analysis.md").read_text()


def test_analyze_whisper_reads_the_speech_frames(audio_dir, tmp_path):
    from vllm_affinity_tools import analyze
    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint

    model = ensure_checkpoint()
    assert analyze.main([str(model), "--audio", str(audio_dir), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "analysis.json").read_text())
    assert [r["layer"] for r in res["layers"]] == ["encoder 0", "encoder 1", "encoder 2", "encoder 3", "LM input"]
    # 2 s + 5 s of speech at 50 frames per second: 100 + 250 frames, one pair fewer per clip
    assert all(r["pairs"] == 348 for r in res["layers"])
    assert res["candidates"] == {"encoder": [1, 2], "deep": []}


@pytest.mark.engine
def test_calibrate_chat_model_walks_resumes_and_its_yaml_serves(tiny_model, audio_dir, tmp_path):
    """Tiny Qwen2-Audio: stock + input (2 ratios, one engine) + deep L=2 (0.5, then 0.3 only if
    0.5 passes). A strict target stops the deep direction after 0.5; the relaxed re-run takes
    stock, input and deep 0.5 from the cache and runs only deep 0.3 and the combination."""
    out = tmp_path / "cal"
    base = [str(tiny_model), "--audio", str(audio_dir), "--stages", "input", "deep", "--input-ratios", "0.5",
            "0.25", "--deep-layers", "2", "--deep-ratios", "0.5", "0.3", "--max-tokens", "6", "--dtype", "float32",
            "--kv-cache-gib", "0.25", "--max-model-len", "2048", "--out", str(out)]
    assert C.main([*base, "--target", "divergence=0"]) == 0
    strict = json.loads((out / "calibration.json").read_text())
    names = [p["name"] for p in strict["points"]]
    # random weights: pooling changes the answers, so nothing meets divergence 0 and deep stops
    if any(p["metrics"]["divergence"] == 0 for p in strict["points"]):
        pytest.skip("a pooled point matched stock exactly on random weights: the stop rule is not exercised")
    assert names == ["input 0.5", "input 0.25", "deep L=2 0.5"] and strict["recommended"] is None
    assert strict["info"]["engines_run"] == 3 and not (out / "recommended.yaml").exists()
    assert any("deep L=2: stopped after deep L=2 0.5" in n for n in strict["notes"])
    # exact counts: each clip's audio placeholders after the input stage follow num_kept
    by = {p["name"]: p for p in strict["points"]}
    stock = _cached(out, None, None)
    for ratio in (0.5, 0.25):
        rows = _cached(out, {"input": {"keep_ratio": 1.0}}, ratio)
        assert [r["audio_tokens"] for r in rows] == [pooling.num_kept(s["audio_tokens"], ratio) for s in stock]
        assert [s["prompt_tokens"] - r["prompt_tokens"] for s, r in zip(stock, rows)] == \
               [s["audio_tokens"] - r["audio_tokens"] for s, r in zip(stock, rows)]
    assert by["deep L=2 0.5"]["metrics"]["audio_tokens_share"] == 1.0  # the deep stage keeps the prompt...
    assert by["deep L=2 0.5"]["metrics"]["kv_share"] < 1.0  # ...and holds fewer KV bytes above L

    assert C.main([*base, "--target", "divergence=100"]) == 0
    relaxed = json.loads((out / "calibration.json").read_text())
    assert relaxed["info"]["engines_run"] == 2  # deep 0.3 and the combination; the rest cached
    rec = relaxed["recommended"]
    # every point passes: the recommendation is the one saving most (KV, then prefill FLOPs)
    assert rec["name"] == min(relaxed["points"], key=lambda p: C.savings_key(p["metrics"]))["name"]
    assert rec["name"] == "input 0.25 + deep L=2 0.3"
    spec = yaml.safe_load((out / "recommended.yaml").read_text())
    assert spec == rec["spec"] == {"deep": {"merge_layer": 2, "keep_ratio": 0.3}, "input": {"keep_ratio": 0.25}}
    load_spec(str(out / "recommended.yaml"))
    assert "WARNING: only 2 answers" in (out / "recommended.yaml").read_text()
    assert (out / "calibration.png").stat().st_size > 0

    # the YAML serves: a real server answers with the prompt tokens calibrate counted
    import openai

    from vllm_affinity_tools.serving import ServerProcess

    from .conftest import ENGINE_KW

    combined = _cached(out, rec["spec"], None)
    clip = sorted(audio_dir.iterdir())[0]
    # as the YAML's header says: prefix caching off serves exactly the measured counts (on, the
    # default, 'auto' aligns them to the KV block)
    assert "add --no-enable-prefix-caching to serve exactly what was measured" in \
        (out / "recommended.yaml").read_text()
    args = ["--affinity", str(out / "recommended.yaml"), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(ENGINE_KW["max_model_len"]), "--kv-cache-memory-bytes", str(256 << 20),
            "--no-enable-prefix-caching"]
    with ServerProcess(tiny_model, args, log_path=tmp_path / "serve.log", served_model_name="tiny") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
        wav = C._wav_data_url(str(clip))
        r = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": wav}},
                                         {"type": "text", "text": C.DEFAULT_PROMPT}]}])
    assert r.usage.prompt_tokens == next(a for a in combined if a["clip"] == str(clip))["prompt_tokens"]


def _cached(out, server, ratio) -> list[dict]:
    """The answers calibrate cached for one (server SPEC, per-request ratio)."""
    for line in (out / "cache.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = json.loads(rec["key"])
        if key["server"] == server and key["ratio"] == ratio:
            return rec["answers"]
    raise AssertionError(f"nothing cached for {server} at {ratio}")


@pytest.mark.engine
def test_calibrate_whisper_encoder_stage(audio_dir, tmp_path):
    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint

    model = ensure_checkpoint()
    out = tmp_path / "cal"
    assert C.main([str(model), "--audio", str(audio_dir), "--stages", "encoder", "--encoder-layers", "2",
                   "--encoder-ratios", "0.5", "--max-tokens", "24", "--dtype", "float32", "--kv-cache-gib", "0.25",
                   "--max-model-len", "448", "--target", "divergence=1", "--out", str(out)]) == 0
    res = json.loads((out / "calibration.json").read_text())
    assert [p["name"] for p in res["points"]] == ["encoder E=2 0.5"] and res["info"]["engines_run"] == 2
    m = res["points"][0]["metrics"]
    # 1500 encoder frames merged to num_kept(1500, 0.5) per clip, read from the scheduler
    assert m["audio_tokens_share"] == pooling.num_kept(1500, 0.5) / 1500
    assert 0.5 < m["kv_share"] < 1.0  # half the frames, size-weighted heads padded 64 -> 80
    assert res["recommended"]["spec"]["encoder"] == {"merge_layer": 2, "keep_ratio": 0.5, "size_weighted": True}
    assert "Whisper" in (out / "calibration.md").read_text()
    # --check: the recommended SPEC measured again from the cache (no engine), a verdict, no new YAML
    (out / "recommended.yaml").rename(tmp_path / "rec.yaml")
    assert C.main([str(model), "--audio", str(audio_dir), "--check", str(tmp_path / "rec.yaml"), "--max-tokens",
                   "24", "--dtype", "float32", "--kv-cache-gib", "0.25", "--max-model-len", "448", "--target",
                   "divergence=1", "--out", str(out)]) == 0
    checked = json.loads((out / "calibration.json").read_text())
    assert checked["info"]["engines_run"] == 0 and checked["recommended"] is None
    assert checked["points"][0]["metrics"]["divergence"] == m["divergence"]
    assert "**Checked**" in (out / "calibration.md").read_text() and not (out / "recommended.yaml").exists()


@pytest.mark.engine
def test_calibrate_kimi_with_a_chat_template(audio_dir, tmp_path):
    """Kimi-Audio: its tokenizer has no chat template (--chat-template, as vllm serve); stock
    answers one request at a time (calibrate.STOCK_ENGINE) with vLLM's chat-template bug
    fixed in the stock process too (else stock renders no message and fails)."""
    model = _tiny("tiny_kimi", "tiny-kimi")
    out = tmp_path / "cal"
    assert C.main([str(model), "--audio", str(audio_dir), "--chat-template", str(model / "chat_template.jinja"),
                   "--check", '{"input": {"keep_ratio": 0.5}}', "--max-tokens", "4", "--dtype", "float32",
                   "--kv-cache-gib", "0.25", "--max-model-len", "2048", "--bootstrap", "20", "--out", str(out)]) == 0
    res = json.loads((out / "calibration.json").read_text())
    assert res["info"]["engines_run"] == 2 and [p["name"] for p in res["points"]] == ["checked SPEC"]
    from vllm_affinity.adapters.kimi_audio import placeholder_count

    import soundfile as sf

    n = [placeholder_count(min(-(-sf.info(str(c)).frames // 160), 3000)) for c in sorted(audio_dir.iterdir())]
    m = res["points"][0]["metrics"]
    assert m["audio_tokens_share"] == pytest.approx(sum(pooling.num_kept(x, 0.5) for x in n) / sum(n))
    assert "Kimi-Audio" in (out / "calibration.md").read_text()


@pytest.mark.parametrize("check, err", [
    ('{"deep": {"merge_layer": 1, "keep_ratio": 0.5}}', "deep is not supported for Whisper"),
    ('{"input": {"keep_ratio": 2}}', "--check.input.keep_ratio"),
    ("/nonexistent/spec.yaml", "not found"),
])
def test_bad_check_spec_stops_before_any_engine(check, err, audio_dir, tmp_path, capsys):
    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint

    assert C.main([str(ensure_checkpoint()), "--audio", str(audio_dir), "--check", check,
                   "--out", str(tmp_path)]) == 2
    assert err in capsys.readouterr().err and not (tmp_path / "cache.jsonl").exists()
