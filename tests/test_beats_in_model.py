"""BEATs plugged into SALMONN (ln_audio, zero-padding, concatenation, checkpoint keys)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.beats import BEATs, BEATsConfig, save_beats
from model.checkpoint import load_checkpoint, save_checkpoint, to_official
from model.errors import CheckpointError
from model.salmonn import SALMONN


@pytest.fixture(scope="module")
def beats_file(tmp_path_factory):
    cfg = BEATsConfig(input_patch_size=16, embed_dim=16, encoder_layers=1, encoder_embed_dim=16,
                      encoder_ffn_embed_dim=32, encoder_attention_heads=2, deep_norm=True, dropout=0.0,
                      attention_dropout=0.0, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True,
                      num_buckets=32, max_distance=64, gru_rel_pos=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("beats") / "tiny_beats.pt"
    save_beats(BEATs(cfg).eval(), str(path))
    return path


def clip(background: str, seconds: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    voice = 0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))   # a voice-like tone
    if background == "noise":
        voice = voice + 0.1 * rng.standard_normal(len(t))
    else:
        voice = voice + 0.1 * np.sin(2 * np.pi * 3000 * t) * (np.sin(2 * np.pi * 5 * t) > 0)  # beeping
    return voice.astype(np.float32)


def test_model_with_beats(tiny_cfg, beats_file):
    model = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    assert not model.speech_only and model.audio_encoder.dim == 16
    keys = set(map(to_official, model.trainable_parameters()))
    assert {"ln_audio.weight", "ln_audio.bias"} <= keys
    cross = model.window_qformer.qformer.encoder.layer[0].crossattention.attention.key.weight
    assert cross.shape[1] == model.speech_encoder.dim + 16          # Whisper width + BEATs width
    tokens = model.encode_audio(clip("noise"))
    assert tokens.embeds.shape[0] == 88


def test_non_speech_content_reaches_the_tokens_through_beats(tiny_cfg, beats_file):
    with_beats = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    speech_only = SALMONN.from_config(tiny_cfg)
    for model in (with_beats, speech_only):
        with torch.no_grad():   # silence the Whisper stream: whatever differs now came through BEATs
            model.window_qformer.ln_speech.weight.zero_()
            model.window_qformer.ln_speech.bias.zero_()
    a, b = clip("noise"), clip("beeps")
    diff_beats = (with_beats.encode_audio(a).embeds - with_beats.encode_audio(b).embeds).abs().max()
    diff_speech = (speech_only.encode_audio(a).embeds - speech_only.encode_audio(b).embeds).abs().max()
    assert diff_speech == 0
    assert diff_beats > 1e-3


def test_official_checkpoint_with_beats_keys(tiny_cfg, beats_file, tmp_path):
    model = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    path = save_checkpoint(model, tmp_path / "salmonn.pth")
    fresh = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    load_checkpoint(fresh, path)
    wav = clip("beeps")
    assert torch.equal(fresh.encode_audio(wav).embeds, model.encode_audio(wav).embeds)
    # the same checkpoint in a speech-only model: a clear message that BEATs is needed
    with pytest.raises(CheckpointError, match=r"Give the BEATs checkpoint"):
        load_checkpoint(SALMONN.from_config(tiny_cfg), path)


def test_short_last_chunk_with_beats(tiny_cfg, beats_file):
    model = SALMONN.from_config(tiny_cfg.replace(beats_path=str(beats_file)))
    wav = np.concatenate([clip("noise", 30.0), clip("beeps", 0.05)])     # 30.05 s: a 50 ms last chunk
    tokens = model.encode_audio(wav)
    assert tokens.embeds.shape[0] == 2 * 88
