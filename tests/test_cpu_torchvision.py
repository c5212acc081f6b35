"""The CPU set-up's torchvision (vllm_affinity_tools/cpu_torchvision.py): the guard it puts on
the two unconditional fake-kernel registrations, and the installed result."""

from __future__ import annotations

import pytest
import torch

from vllm_affinity_tools import cpu_torchvision as tv

SOURCE = '''import torch
import torchvision.extension


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets
'''


def test_guard_registers_the_fakes_only_when_the_ops_loaded():
    guarded = tv.guard_registrations(SOURCE)
    assert '@torch.library.register_fake("torchvision::nms")\n' not in guarded
    assert guarded.count("if torchvision.extension._has_ops() else (lambda fn: fn))") == 2
    compile(guarded, "_meta_registrations.py", "exec")  # still valid Python


@pytest.mark.parametrize("missing", ["nms", "qnms"])
def test_guard_refuses_a_file_it_does_not_know(missing):
    source = SOURCE.replace(f'register_fake("torchvision::{missing}")', 'register_fake("torchvision::other")')
    with pytest.raises(ValueError, match=f"torchvision::{missing}"):
        tv.guard_registrations(source)


@pytest.mark.skipif(torch.version.cuda is not None, reason="CUDA torch: pip's torchvision is used as is")
def test_installed_torchvision_is_the_python_layer():
    import importlib.util
    from pathlib import Path

    import torchvision
    import torchvision.transforms.v2.functional as F
    from transformers import Qwen2VLVideoProcessor

    pkg = Path(importlib.util.find_spec("torchvision").origin).parent
    assert (pkg / tv.MARKER).exists()
    assert not any((pkg / name).exists() for name in tv.CUDA_BINARIES)
    assert torchvision.__version__.startswith(tv.TORCHVISION_FOR_TORCH[torch.__version__.split("+")[0]])
    assert F.resize(torch.rand(3, 20, 30), [10, 15]).shape == (3, 10, 15)
    Qwen2VLVideoProcessor()  # what transformers' Omni processors load
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)
