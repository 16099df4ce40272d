"""Two checkpoints over one loaded model (the app's activation- vs instruction-tuned comparison):
a variant answers exactly as a model loaded with its checkpoint alone, the two can take turns, and a
checkpoint that does not fit is refused without disturbing the first."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.errors import CheckpointError
from model.pipeline import Pipeline
from model.salmonn import SALMONN
from tests.conftest import randomize_lora


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def nll(pipe: Pipeline, wav) -> list[float]:
    return [s.nll for s in pipe.score(wav, "Describe the audio.", "the dog says hello", lora_scales=[1.0, 4.0])]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = SALMONN.from_config(tiny_cfg)
        randomize_lora(model, seed)
        with torch.no_grad():
            for p in model.window_qformer.parameters():
                p.add_(0.05 * torch.randn_like(p))
        paths.append(save_checkpoint(model, out / f"ckpt{seed}.safetensors"))
    return paths


def test_variant_equals_its_own_model_and_they_take_turns(tiny_cfg, two_checkpoints):
    a_path, b_path = two_checkpoints
    wav = tone(1.5, 500)
    only_b = Pipeline(SALMONN.from_config(tiny_cfg.replace(ckpt=str(b_path))))
    alone_a = nll(Pipeline(SALMONN.from_config(tiny_cfg.replace(ckpt=str(a_path)))), wav)
    alone_b = nll(only_b, wav)
    assert not np.allclose(alone_a, alone_b)

    first = Pipeline(SALMONN.from_config(tiny_cfg.replace(ckpt=str(a_path))))
    second = first.variant(b_path)
    assert second.model is first.model                      # one LLM in memory
    assert second.info()["checkpoint"] == str(b_path)
    for _ in range(2):                                      # interleaved: each swaps its own weights in
        np.testing.assert_allclose(nll(second, wav), alone_b, rtol=1e-5)
        np.testing.assert_allclose(nll(first, wav), alone_a, rtol=1e-5)
    text = first.answer(wav, "Describe the audio.").text
    assert second.answer(wav, "Describe the audio.").text == only_b.answer(wav, "Describe the audio.").text
    assert first.answer(wav, "Describe the audio.").text == text


def test_mismatched_variant_is_refused_and_the_first_is_untouched(tiny_cfg, two_checkpoints, tmp_path):
    a_path, _ = two_checkpoints
    first = Pipeline(SALMONN.from_config(tiny_cfg.replace(ckpt=str(a_path))))
    wav = tone(1.0, 300)
    before = nll(first, wav)
    q = tiny_cfg.qformer
    wide = SALMONN.from_config(tiny_cfg.replace(qformer=dataclasses.replace(
        q, hidden_size=q.hidden_size * 2, intermediate_size=q.intermediate_size * 2)))
    bad = save_checkpoint(wide, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        first.variant(bad)
    with pytest.raises(Exception, match="does not exist"):
        first.variant(tmp_path / "missing.safetensors")
    np.testing.assert_allclose(nll(first, wav), before, rtol=1e-6)
