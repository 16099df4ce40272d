"""SALMONN-tiny's own BEATs: trained on synthetic labels (train/beats_fit.py), stored as safetensors,
joined to speech-only weights without changing their answers, and brought in by the checkpoints
that were trained with it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.beats import BEATs, BEATsConfig, load_beats, save_beats
from model.errors import CheckpointError, ConfigError
from model.fbank import beats_fbank
from model.salmonn import SALMONN
from train import beats_fit
from train.beats_fit import HEADS, SOUND_KINDS, clip_targets, evaluate, fit

TINY = dict(input_patch_size=16, embed_dim=16, encoder_layers=1, encoder_embed_dim=16, encoder_ffn_embed_dim=32,
            encoder_attention_heads=2, deep_norm=True, dropout=0.0, attention_dropout=0.0, conv_pos=16,
            conv_pos_groups=4, relative_position_embedding=True, num_buckets=32, max_distance=64, gru_rel_pos=True)


def test_targets_follow_the_labels():
    music = clip_targets({"type": "music", "sound": {"kind": "music", "key": "Bb", "mode": "minor", "bpm": 78,
                                                     "tempo": "slow", "timbre": "sine", "has_drums": False,
                                                     "texture": "melody"}})
    assert music["kind"] == SOUND_KINDS.index("music") and HEADS["key"][music["key"]] == "Bb"
    assert HEADS["mode"][music["mode"]] == "minor" and HEADS["drums"][music["drums"]] is False
    assert music["log_bpm"] == pytest.approx(math.log(78)) and music["count"] == -100 and music["speech"] == 0
    knocks = clip_targets({"type": "sound", "sound": {"kind": "knock", "count": 4}})
    assert HEADS["count"][knocks["count"]] == 4 and knocks["key"] == -100 and math.isnan(knocks["log_bpm"])
    # speech over a background: the background's kind, and the speaker
    mixed = clip_targets({"type": "speech_audio", "sound": {"kind": "wind"},
                          "speech": {"gender": "female", "rate_label": "fast"}})
    assert SOUND_KINDS[mixed["kind"]] == "wind" and mixed["speech"] == 1
    assert HEADS["gender"][mixed["gender"]] == "female" and HEADS["rate"][mixed["rate"]] == "fast"
    speech = clip_targets({"type": "speech", "speech": {"gender": "male", "rate_label": "slow"}})
    assert SOUND_KINDS[speech["kind"]] == "none"


def _clip(kind: str, rng: np.random.Generator) -> dict:
    t = np.arange(int(16000 * rng.uniform(1.0, 2.0))) / 16000
    if kind == "beeps":      # a high tone, on and off
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(1500, 2500) * t) * (np.sin(2 * np.pi * 4 * t) > 0)
    else:                    # low rumbling noise
        wav = 0.3 * np.convolve(rng.standard_normal(len(t)), np.ones(40) / 40, mode="same")
    fbank = beats_fbank(torch.from_numpy(wav.astype(np.float32))[None])[0].half()
    return {"id": kind, "fbank": fbank, "targets": clip_targets({"sound": {"kind": kind}})}


def test_fit_learns_to_tell_sounds_apart():
    rng = np.random.default_rng(0)
    train = [_clip(k, rng) for k in ["beeps", "engine"] * 8]
    held_out = [_clip(k, rng) for k in ["beeps", "engine"] * 4]
    beats, heads, history = fit(train, BEATsConfig(**TINY), steps=40, batch_size=8, lr=3e-3, log=lambda m: None)
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(beats, heads, held_out)["kind"] == 1.0


def test_safetensors_round_trip_and_refusal(tmp_path):
    torch.manual_seed(0)
    beats = BEATs(BEATsConfig(**TINY)).eval()
    path = tmp_path / "b.safetensors"
    save_beats(beats, str(path), metadata={"note": "test"})
    wav = torch.randn(1, 16000) * 0.1
    assert torch.equal(load_beats(str(path)).extract_features(wav)[0], beats.extract_features(wav)[0])
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a BEATs checkpoint"):
        load_beats(str(foreign))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="could not read"):
        load_beats(str(tmp_path / "broken.safetensors"))


@pytest.fixture(scope="module")
def beats_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("beats-fit") / "beats.safetensors"
    save_beats(BEATs(BEATsConfig(**TINY)).eval(), str(path))
    return path


def test_speech_only_weights_join_a_beats_model_unchanged(tiny_cfg, beats_file, tmp_path):
    """recipe --init from speech-only weights: the BEATs stream starts at zero, so the audio tokens
    (and hence the answers) are exactly those of the speech-only model; training then moves them."""
    from model.checkpoint import save_checkpoint
    from tests.conftest import randomize_lora
    from train.recipe import init_weights

    torch.manual_seed(0)
    speech_only = SALMONN.from_config(tiny_cfg).eval()
    randomize_lora(speech_only)
    ckpt = save_checkpoint(speech_only, tmp_path / "speech.safetensors")
    both = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file))).eval()
    assert "BEATs stream added" in init_weights(both, str(ckpt))
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    a = speech_only.encode_audio(wav, output_attentions=False).embeds
    b = both.encode_audio(wav, output_attentions=False).embeds
    assert torch.allclose(a, b, atol=1e-5)
    qf = both.window_qformer.qformer.encoder.layer[0].crossattention.attention.key.weight
    assert qf.shape[1] == both.speech_encoder.dim + both.audio_encoder.dim
    assert torch.count_nonzero(qf[:, both.speech_encoder.dim:]) == 0
    # --beats-init 1: the new columns start random, at the speech columns' scale
    assert "at 1 x" in init_weights(both, str(ckpt), audio_init=1.0)
    speech, audio = qf.detach()[:, :both.speech_encoder.dim], qf.detach()[:, both.speech_encoder.dim:]
    assert audio.pow(2).mean().sqrt().item() == pytest.approx(speech.pow(2).mean().sqrt().item(), rel=0.2)


def test_a_checkpoint_trained_with_beats_brings_it_in(tiny_cfg, beats_file, tmp_path, monkeypatch):
    from model import defaults
    from model.checkpoint import save_checkpoint

    model = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    with_beats = save_checkpoint(model, tmp_path / "with.safetensors")
    without = save_checkpoint(SALMONN.from_config(tiny_cfg), tmp_path / "without.safetensors")
    assert defaults.reads_audio_stream(with_beats) and not defaults.reads_audio_stream(without)
    assert not defaults.reads_audio_stream(tmp_path / "missing.safetensors")
    monkeypatch.setattr(defaults, "BEATS_TINY", beats_file)
    assert defaults.beats_for(with_beats) == str(beats_file)
    assert defaults.beats_for(with_beats, "/my/BEATs.pt") == "/my/BEATs.pt"      # the user's choice wins
    assert defaults.beats_for(without) == "" and defaults.beats_for("") == ""
    monkeypatch.setattr(defaults, "BEATS_TINY", tmp_path / "gone.safetensors")
    with pytest.raises(ConfigError, match="beats_fit"):
        defaults.beats_for(with_beats)


def test_load_clips_reads_a_make_data_folder(tmp_path):
    """The tool's front end on a generated folder: one fbank and target set per training clip."""
    from train.make_data import generate

    generate(tmp_path / "d", seed=3, scale=0.01)
    clips = beats_fit.load_clips([str(tmp_path / "d")], "train", max_seconds=10.0)
    assert clips and all(c["fbank"].shape[1] == 128 for c in clips)
    assert {c["targets"]["speech"] for c in clips} <= {0, 1}
