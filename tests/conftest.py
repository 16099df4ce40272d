"""Shared fixtures: a tiny random SALMONN (real loading code, tiny random weights) built once."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Apps the tests build write their uploads and renders here, removed when the test run ends.
_GRADIO_TEMP = tempfile.mkdtemp(prefix="salmonn-studio-tests-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TEMP
atexit.register(shutil.rmtree, _GRADIO_TEMP, True)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root):
    from model.random_tiny import tiny_config

    return tiny_config(tiny_root)


def randomize_lora(model, seed: int = 0) -> None:
    """peft starts LoRA B at zero (LoRA off); give it weights so the scale matters in tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from model.salmonn import SALMONN

    model = SALMONN.from_config(tiny_cfg)
    randomize_lora(model)
    return model


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    from model.pipeline import Pipeline

    return Pipeline(tiny_model)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of small tensors: on a busy 2-core box, intra-op threads only fight each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, atol: float):
    # torch.testing.assert_close costs ~2 s of lazy imports on first use; this is all we need.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"
