"""Config validation, presets, per-request values and the CLI's command building."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from vllm_affinity import cli
from vllm_affinity.config import (
    AffinityConfigError,
    load_spec,
    preset_names,
    presets_dir,
    request_keep_ratio,
)


@pytest.mark.parametrize(
    "name", ["paper-aggressive", "paper-conservative", "off", "uniform-74", "input-only", "deep-only"]
)
def test_presets_load(name):
    assert name in preset_names()
    load_spec(name)


def test_paper_aggressive_uses_measured_retention():
    cfg = load_spec("paper-aggressive")
    assert cfg.input.keep_ratio == 0.7432 and cfg.input.window == 1 and cfg.input.method == "affinity"
    # DAP aggressive keeps 14.91% after both stages: 0.7432 * deep ratio
    assert abs(cfg.input.keep_ratio * cfg.deep.keep_ratio - 0.1491) < 5e-4
    assert cfg.deep.window == 3 and cfg.deep.resolve_layer(32) == 29
    assert load_spec("deep-only").deep.keep_ratio == 0.0518 and load_spec("deep-only").input is None
    assert not load_spec("off").enabled


def test_every_preset_states_its_basis():
    for path in presets_dir().glob("*.yaml"):
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        if data.get("input"):
            assert "Basis:" in text, f"{path.name} does not state the basis of its values"


def test_spec_object_path_and_missing_stage(tmp_path):
    assert load_spec({"input": {"keep_ratio": 0.5}}).input.window == 1
    assert load_spec({}).input is None
    f = tmp_path / "mine.yaml"
    f.write_text("input:\n  keep_ratio: 0.6\n  window: 2\n  method: uniform\n")
    cfg = load_spec(str(f))
    assert (cfg.input.keep_ratio, cfg.input.window, cfg.input.method) == (0.6, 2, "uniform")


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"input": {"keep_ratio": 0}}, "input.keep_ratio"),
        ({"input": {"keep_ratio": 1.2}}, "input.keep_ratio"),
        ({"input": {"keep_ratio": "half"}}, "input.keep_ratio"),
        ({"input": {"keep_ratio": True}}, "input.keep_ratio"),
        ({"input": {"keep_ratio": float("nan")}}, "input.keep_ratio"),
        ({"input": {"keep_ratio": 0.5, "window": 0}}, "input.window"),
        ({"input": {"keep_ratio": 0.5, "method": "random"}}, "input.method"),
        ({"input": {"keep_ratio": 0.5, "windw": 2}}, "input.windw"),
        ({"input": {}}, "input.keep_ratio"),
        ({"deep": {"merge_layer": 29}}, "deep.keep_ratio"),
        ({"deep": {"merge_layer": 1.5, "keep_ratio": 0.1}}, "deep.merge_layer"),
        ({"deep": {"merge_layer": 1, "keep_ratio": 0.1, "window": 0}}, "deep.window"),
        ({"deep": {"merge_layer": 1, "keep_ratio": 1.1}}, "deep.keep_ratio"),
        ({"deep": {"merge_layer": 1, "keep_ratio": 0.1, "where": 2}}, "deep.where"),
        ({"allow_request_override": "maybe"}, "allow_request_override"),
        ("no-such-preset", "unknown preset"),
        ("/nonexistent/file.yaml", "not found"),
        (42, "must be a preset name"),
    ],
)
def test_bad_spec_names_the_field(spec, field):
    with pytest.raises(AffinityConfigError) as e:
        load_spec(spec, where="hf_overrides.affinity")
    assert field in str(e.value)
    assert "hf_overrides.affinity" in str(e.value)


@pytest.mark.parametrize("layer, n, expect", [(29, 32, 29), (-3, 32, 29), (-3, 4, 1), (0, 4, 0), (2, 4, 2)])
def test_merge_layer_resolves(layer, n, expect):
    assert load_spec({"deep": {"merge_layer": layer, "keep_ratio": 0.5}}).deep.resolve_layer(n) == expect


@pytest.mark.parametrize("layer, n", [(31, 32), (3, 4), (-1, 4), (-5, 4), (0, 1)])
def test_merge_layer_out_of_range_names_the_field(layer, n):
    cfg = load_spec({"deep": {"merge_layer": layer, "keep_ratio": 0.5}})
    with pytest.raises(AffinityConfigError, match="deep.merge_layer"):
        cfg.deep.resolve_layer(n)


def test_request_override():
    cfg = load_spec("paper-aggressive")
    assert request_keep_ratio(cfg, None) == 0.7432
    assert request_keep_ratio(cfg, {"affinity_keep_ratio": 0.5}) == 0.5
    assert request_keep_ratio(cfg, {"affinity_keep_ratio": 1}) == 1.0
    assert request_keep_ratio(load_spec("off"), {}) == 1.0
    for bad in (0, 1.5, -1, "0.5", None, True, float("inf"), [0.5]):
        with pytest.raises(AffinityConfigError, match="mm_processor_kwargs.affinity_keep_ratio"):
            request_keep_ratio(cfg, {"affinity_keep_ratio": bad})
    locked = load_spec({"input": {"keep_ratio": 0.7}, "allow_request_override": False})
    with pytest.raises(AffinityConfigError, match="disabled"):
        request_keep_ratio(locked, {"affinity_keep_ratio": 0.5})


# -- CLI ------------------------------------------------------------------------------------
def _serve(argv, env=None):
    return cli.build_serve_command(argv, env or {"PATH": ""})


def test_serve_translates_spec_to_hf_overrides():
    cmd, env = _serve(["m", "--plugin", "affinity", "--affinity", "paper-conservative", "--port", "9"])
    assert cmd[1:3] == ["serve", "m"]
    assert "--port" in cmd and "--plugin" not in cmd and "--affinity" not in cmd
    i = cmd.index("--hf-overrides")
    assert json.loads(cmd[i + 1]) == {"affinity": "paper-conservative"}
    assert "--trust-request-mm-kwargs" in cmd


def test_serve_merges_existing_hf_overrides_and_json_spec():
    cmd, _ = _serve(["m", "--hf-overrides", '{"max_position_embeddings": 9}',
                     "--affinity", '{"input": {"keep_ratio": 0.5}}'])
    ov = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert ov == {"max_position_embeddings": 9, "affinity": {"input": {"keep_ratio": 0.5}}}


def test_serve_default_preset_and_plugin_allow_list():
    cmd, env = _serve(["m"], {"VLLM_PLUGINS": "lora_filesystem_resolver", "PATH": ""})
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"affinity": cli.DEFAULT_PRESET}
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,affinity"
    _, env = _serve(["m"], {"VLLM_PLUGINS": "", "PATH": ""})
    assert env["VLLM_PLUGINS"] == "affinity"


def test_serve_locked_spec_does_not_trust_request_kwargs(tmp_path):
    f = tmp_path / "locked.yaml"
    f.write_text("input: {keep_ratio: 0.7}\nallow_request_override: false\n")
    cmd, _ = _serve(["m", "--affinity", str(f)])
    assert "--trust-request-mm-kwargs" not in cmd


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["m", "--plugin", "fastv"], "unknown plugin 'fastv'"),
        (["m", "--affinity", '{"input": {"keep_ratio": 2}}'], "input.keep_ratio"),
        (["m", "--affinity", "{not json"], "invalid JSON"),
        (["m", "--affinity", "off", "--hf-overrides", '{"affinity": "off"}'], "give the SPEC once"),
        (["m", "--affinity"], "needs a value"),
    ],
)
def test_serve_refuses_bad_arguments(argv, msg):
    with pytest.raises(cli.UsageError, match=msg):
        _serve(argv)


def test_cli_exit_code_and_message():
    r = subprocess.run(
        [sys.executable, "-m", "vllm_affinity.cli", "serve", "m", "--affinity", '{"input": {"window": 2}}'],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "input.keep_ratio" in r.stderr


def test_package_import_is_cheap():
    code = (
        "import sys, vllm_affinity, vllm_affinity.config, vllm_affinity.cli;"
        "bad=[m for m in ('vllm','torch','transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wheel_ships_presets(tmp_path):
    """Installed from a wheel (no source tree beside it), presets still resolve."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("vllm_affinity-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import vllm_affinity.config as c; d=c.presets_dir(); assert 'site' in str(d), d;"
            "assert c.load_spec('paper-aggressive').input.keep_ratio == 0.7432;"
            "assert (d / 'models/qwen2-audio-7b-instruct/config.json').is_file()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""})


# every server-side field: `vllm-affinity serve` exits non-zero naming it, before vLLM starts
BAD_SERVER_FIELDS = {
    "input.keep_ratio": {"input": {"keep_ratio": 0}},
    "input.window": {"input": {"keep_ratio": 0.5, "window": 0}},
    "input.method": {"input": {"keep_ratio": 0.5, "method": "random"}},
    "input.kv_block_align": {"input": {"keep_ratio": 0.5, "kv_block_align": "yes"}},
    "deep.merge_layer": {"deep": {"merge_layer": "last", "keep_ratio": 0.2}},
    "deep.keep_ratio": {"deep": {"merge_layer": 1, "keep_ratio": 2}},
    "deep.window": {"deep": {"merge_layer": 1, "keep_ratio": 0.2, "window": -1}},
    "deep.method": {"deep": {"merge_layer": 1, "keep_ratio": 0.2, "method": "max"}},
    "allow_request_override": {"allow_request_override": "sometimes"},
    "min_request_keep_ratio": {"min_request_keep_ratio": -0.1},
    "max_request_keep_ratio": {"max_request_keep_ratio": 0},
    "max_audio_seconds": {"max_audio_seconds": 0},
    "extra": {"inptu": {"keep_ratio": 0.5}},
}


@pytest.mark.parametrize("field", list(BAD_SERVER_FIELDS))
def test_every_bad_server_field_exits_before_vllm_starts(field):
    spec = json.dumps(BAD_SERVER_FIELDS[field])
    r = subprocess.run([sys.executable, "-m", "vllm_affinity.cli", "serve", "some/model", "--affinity", spec],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert (field if field != "extra" else "inptu") in r.stderr
    assert "exec:" not in r.stderr  # vLLM was never started


def test_serve_off_is_plain_vllm_without_the_plugin():
    cmd, env = _serve(["m", "--affinity", "off", "--port", "9"], {"PATH": "", "VLLM_PLUGINS": "affinity,other"})
    assert cmd[1:] == ["serve", "m", "--port", "9"]
    assert env["VLLM_PLUGINS"] == "other"
    cmd, env = _serve(["m", "--affinity", "off", "--hf-overrides", '{"max_position_embeddings": 9}'])
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"max_position_embeddings": 9}
    assert "affinity" not in env["VLLM_PLUGINS"].split(",")
