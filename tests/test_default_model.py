"""Issue 4: the shipped SALMONN-tiny checkpoint loads into the default model and really hears."""
from __future__ import annotations

import pytest

from model.config import GenerateConfig
from model.defaults import ASSETS, CHECKPOINTS
from train.evaluate import answer_correct, wer

GREEDY = GenerateConfig(max_new_tokens=40, num_beams=1, repetition_penalty=1.1)
EXAMPLES = ASSETS / "examples"


@pytest.fixture(scope="module")
def default_pipeline():
    from model.defaults import default_config
    from model.pipeline import Pipeline

    return Pipeline.from_config(default_config("activation"))


def test_shipped_checkpoints_are_small_safetensors():
    for path in CHECKPOINTS.values():
        assert path.is_file() and path.suffix == ".safetensors"
        assert path.stat().st_size <= 25 * 2**20


def test_default_model_transcribes_a_bundled_espeak_clip(default_pipeline):
    info = default_pipeline.info()
    assert info["speech_only"] and info["name"] == "SALMONN-tiny"
    answer = default_pipeline.answer(EXAMPLES / "request.wav", "Recognize the speech and give me the transcription.",
                                     generate=GREEDY)
    assert wer(["Please set an alarm for seven thirty tomorrow morning."], [answer.text]) <= 0.5, answer.text


def test_default_model_describes_sounds(default_pipeline):
    answer = default_pipeline.answer(EXAMPLES / "rain_beeps.wav", "Please describe the audio.", generate=GREEDY)
    assert any(w in answer.text.lower() for w in ("beep", "rain", "tone")), answer.text
