"""The shipped SALMONN-tiny checkpoints load into the default model, which listens.

What is tested: the default model transcribes one bundled clip of its training domain, in a voice it
never heard, with at most 2 word errors (greedy), and the transcription preset's CTC-guided beam search
stays within the issue's 20 % WER on held-out sentences in held-out voices (held-out numbers on the
full evaluation set are in assets/MODEL_CARD.md).
"""
from __future__ import annotations

import pytest

from model.config import GenerateConfig
from model.defaults import ASSETS, CHECKPOINTS

GREEDY = GenerateConfig(max_new_tokens=24, num_beams=1, repetition_penalty=1.1)
EXAMPLES = ASSETS / "examples"


@pytest.fixture(scope="module")
def default_pipeline():
    from model.defaults import default_config
    from model.pipeline import Pipeline

    return Pipeline.from_config(default_config("activation"))


def test_shipped_checkpoints_are_small_safetensors():
    """Both files hold their LoRA in bfloat16 and say how it was trained (rank, alpha, layers), so they load
    with it and stay small in the repository."""
    import json

    from safetensors import safe_open

    for path in CHECKPOINTS.values():
        assert path.is_file() and path.suffix == ".safetensors"
        assert path.stat().st_size <= 32 * 2**20
        with safe_open(str(path), "pt") as f:
            lora = json.loads((f.metadata() or {})["lora"])
            assert {f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k} == {"BF16"}
        assert lora["alpha"] / lora["rank"] == 4.0


def test_default_model_loads_and_answers(default_pipeline):
    info = default_pipeline.info()
    assert info["speech_only"] and info["name"] == "SALMONN-tiny"
    assert default_pipeline.trained_scale == 4.0
    answer = default_pipeline.answer(EXAMPLES / "request.wav", "Recognize the speech and give me the transcription.",
                                     generate=GREEDY)
    assert answer.num_tokens > 0 and answer.text.strip()
    # SALMONN-tiny makes 2 audio tokens per 17-frame window (the shipped weights hold 2 queries)
    from model.audio import prepare_audio

    tokens = default_pipeline.model.encode_audio(prepare_audio(EXAMPLES / "request.wav").wav, output_attentions=True)
    assert tokens.embeds.shape[0] == 2 * len(tokens.window_starts) == 2 * tokens.cross_attentions.shape[0]


def test_answers_depend_on_the_audio_and_the_lora_scale(default_pipeline):
    ask = "Please describe the audio."
    beeps = default_pipeline.answer(EXAMPLES / "rain_beeps.wav", ask, generate=GREEDY).text
    melody = default_pipeline.answer(EXAMPLES / "melody.wav", ask, generate=GREEDY).text
    assert beeps != melody                       # the model hears a difference between the clips
    base = default_pipeline.answer(EXAMPLES / "melody.wav", ask, generate=GREEDY, lora_scale=0.0).text
    assert base != melody                        # the trained LoRA changes what the LLM says


def test_launch_loads_both_checkpoints_over_one_model():
    """`python launch_app.py` offers the instruction-tuned checkpoint beside the default one without
    a second LLM in memory; each answers with its own weights."""
    import launch_app

    pipes = launch_app.load_pipelines(launch_app.build_configs(launch_app.parse_args(["--device", "cpu"])))
    (name0, act), (name1, ins) = pipes
    assert (name0, name1) == ("activation-tuned", "instruction-tuned")
    assert ins.model is act.model and ins.cfg.ckpt == str(CHECKPOINTS["instruction"])
    ask, clip = "Recognize the speech and give me the transcription.", EXAMPLES / "request.wav"
    a = act.score(clip, ask, "hello there", lora_scales=[4.0])[0].nll
    b = ins.score(clip, ask, "hello there", lora_scales=[4.0])[0].nll
    assert a != b and act.score(clip, ask, "hello there", lora_scales=[4.0])[0].nll == a


def test_default_model_transcribes_a_clip_in_an_unseen_voice(default_pipeline):
    from app.presets import EXAMPLES_BY_FILE
    from train.evaluate import wer

    clip = EXAMPLES_BY_FILE["dictation.wav"]
    answer = default_pipeline.answer(clip.path, "Recognize the speech and give me the transcription.", generate=GREEDY)
    # 8 words; at most 2 wrong (the shipped weights get 7: "book" comes out as a longer word)
    assert wer([clip.transcript], [answer.text]) <= 0.25, answer.text


def test_transcription_preset_decoding_hears_held_out_sentences_in_unseen_voices(default_pipeline):
    """The transcription preset's decoding (4 beams, CTC-guided by the head the checkpoint carries) on
    held-out sentences spoken in held-out voices, made here: within the issue's 20 % WER target, and
    fewer errors than plain greedy decoding of the same clips."""
    import numpy as np

    from app.presets import PRESETS_BY_KEY
    from train import synth
    from train.evaluate import wer

    assert default_pipeline.info()["ctc_head"]
    preset = PRESETS_BY_KEY["asr"]
    scale, beams, ctc = preset.suggested(default_pipeline.trained_scale)
    assert ctc > 0 and beams > 1
    rng = np.random.default_rng(5)
    voices = synth.voices("eval")
    texts = [synth.sentence_for("eval", rng) for _ in range(10)]
    audio = [synth.pad(synth.speech(t, rng, voice=voices[i % len(voices)])[0], rng) for i, t in enumerate(texts)]
    guided = GenerateConfig(max_new_tokens=48, num_beams=beams, repetition_penalty=1.1, ctc_weight=ctc)
    plain = [default_pipeline.answer(a, preset.prompt, generate=GREEDY).text for a in audio]
    heard = [default_pipeline.answer(a, preset.prompt, generate=guided, lora_scale=scale).text for a in audio]
    assert wer(texts, heard) <= 0.2, list(zip(texts, heard))
    assert wer(texts, heard) < wer(texts, plain)
