"""The SALMONN core on tiny random parts (real loading code, no downloads)."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from model.audio import prepare_audio
from model.checkpoint import from_official, load_checkpoint, read_state_dict, save_checkpoint, to_official
from model.config import GenerateConfig, QFormerConfig, load_config
from model.errors import AudioError, CheckpointError, ConfigError, PromptError
from model.llm import lora_layers, lora_scale
from model.qformer import WindowQFormer, cut_windows
from model.salmonn import SALMONN

GREEDY = GenerateConfig(max_new_tokens=12, num_beams=1)


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


# ---------------------------------------------------------------- window maths
def test_official_window_geometry():
    cfg = QFormerConfig()
    assert (cfg.window_frames, cfg.stride_frames) == (17, 17)
    x = torch.randn(2, 1500, 12)
    windows = cut_windows(x, 17, 17)
    assert windows.shape == (2, 88, 17, 12)
    assert torch.equal(windows, x[:, : 88 * 17].reshape(2, 88, 17, 12))


def test_qformer_tokens_and_attention_probabilities():
    cfg = QFormerConfig(hidden_size=32, num_heads=4, intermediate_size=64, num_query_tokens=2)
    qf = WindowQFormer(cfg, speech_dim=24, audio_dim=8).eval()
    speech, audio = torch.randn(1, 1500, 24), torch.randn(1, 1000, 8)
    out = qf(speech, audio, output_attentions=True)
    assert out.tokens.shape == (1, 88 * 2, 32)
    assert out.cross_attentions.shape == (1, 88, 2, 4, 2, 17)
    torch.testing.assert_close(out.cross_attentions.sum(-1), torch.ones(1, 88, 2, 4, 2))
    # Whisper channels first; BEATs zero-padded in time after its LayerNorm (exact zeros).
    fused = qf.fuse(speech, audio)
    assert fused.shape == (1, 1500, 32)
    assert torch.count_nonzero(fused[:, 1000:, 24:]) == 0
    torch.testing.assert_close(fused[:, :, :24], qf.ln_speech(speech))


def test_lead_in_gives_an_abrupt_start_quiet_and_leaves_a_quiet_start_alone(tiny_model, monkeypatch):
    from model.salmonn import with_lead_in

    abrupt = tone(1.0)
    quiet_first = np.concatenate([np.zeros(8000, np.float32), tone(1.0)])
    plain = {name: tiny_model.encode_audio(w) for name, w in (("abrupt", abrupt), ("quiet", quiet_first))}
    padded = np.concatenate([np.zeros(4000 - 1, np.float32), abrupt])   # sin starts at 0: 1 quiet sample already
    assert np.array_equal(with_lead_in(abrupt, 0.25), padded)
    assert len(with_lead_in(quiet_first[6000:], 0.25)) == len(quiet_first[6000:]) + 1999   # 2001 quiet samples: topped up
    assert with_lead_in(quiet_first, 0.25) is quiet_first and with_lead_in(np.zeros(0, np.float32), 0.25).size == 0

    monkeypatch.setattr(tiny_model, "cfg", tiny_model.cfg.replace(lead_in_seconds=0.25))
    got = tiny_model.encode_audio(abrupt)
    assert got.seconds == pytest.approx(len(padded) / 16000) and got.seconds > plain["abrupt"].seconds
    monkeypatch.undo()
    assert torch.equal(got.embeds, tiny_model.encode_audio(padded).embeds)   # the model hears the padded audio
    monkeypatch.setattr(tiny_model, "cfg", tiny_model.cfg.replace(lead_in_seconds=0.25))
    same = tiny_model.encode_audio(quiet_first)
    assert torch.equal(same.embeds, plain["quiet"].embeds) and same.seconds == plain["quiet"].seconds
    assert got.lead_in == pytest.approx(3999 / 16000) and same.lead_in == 0.0
    # a clip that fills its chunk gets no lead-in: padding would cut its last 0.25 s off into a new chunk
    full = tiny_model.encode_audio(tone(tiny_model.cfg.chunk_seconds))
    assert len(full.chunk_starts) == 1 and full.lead_in == 0.0


# ---------------------------------------------------------------- checkpoint
def test_checkpoint_round_trip_official_layout(tiny_cfg, tiny_model, tmp_path):
    official = set(map(to_official, tiny_model.trainable_parameters()))
    assert "speech_query_tokens" in official and "ln_speech.weight" in official
    assert "speech_Qformer.bert.embeddings.LayerNorm.weight" in official
    assert "speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in official
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in official
    assert all(from_official(to_official(n)) == n for n in tiny_model.trainable_parameters())

    wav = tone(2.0)
    audio = tiny_model.encode_audio(wav).embeds
    text = tiny_model.prompt.conversation(["Describe the audio."])
    ref = tiny_model.target_logprobs([audio], [text], [[5, 6, 7, 8]])[0]
    for suffix in (".pth", ".safetensors"):
        path = save_checkpoint(tiny_model, tmp_path / f"ckpt{suffix}")
        fresh = SALMONN.from_config(tiny_cfg)      # different random Q-Former, LoRA B = 0
        load_checkpoint(fresh, path)
        got = fresh.target_logprobs([fresh.encode_audio(wav).embeds], [text], [[5, 6, 7, 8]])[0]
        assert torch.equal(got, ref)
    # The official .pth layout is {"model": {official names: tensors}} plus ignorable buffers.
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert set(raw) == {"model"} and set(raw["model"]) == official


def _write_official(tmp_path, state, name="c.pth"):
    path = tmp_path / name
    torch.save({"model": state, "epoch": 3}, path)
    return path


def test_checkpoint_accounting_names_the_key(tiny_cfg, tiny_model, tmp_path):
    from model.checkpoint import trainable_state_dict

    good = trainable_state_dict(tiny_model)
    fresh = SALMONN.from_config(tiny_cfg)
    # known buffers of the official training code are accepted and ignored
    extra = dict(good)
    extra["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    extra["llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    extra["beats.encoder.layers.3.self_attn.relative_attention_bias.weight"] = torch.zeros(320, 12)
    assert len(load_checkpoint(fresh, _write_official(tmp_path, extra))) == 3

    missing = dict(good)
    del missing["speech_llama_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing[\s\S]*speech_llama_proj\.bias"):
        load_checkpoint(fresh, _write_official(tmp_path, missing))

    renamed = dict(good)
    renamed["speech_llama_projection.weight"] = renamed.pop("speech_llama_proj.weight")
    with pytest.raises(CheckpointError, match=r"unknown[\s\S]*speech_llama_projection\.weight"):
        load_checkpoint(fresh, _write_official(tmp_path, renamed))

    shaped = dict(good)
    key = "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"
    shaped[key] = torch.zeros(shaped[key].shape[0], shaped[key].shape[1] + 768)
    with pytest.raises(CheckpointError, match=r"crossattention\.self\.key\.weight: checkpoint \(32, 800\) vs model \(32, 32\)[\s\S]*BEATs"):
        load_checkpoint(fresh, _write_official(tmp_path, shaped))


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/salmonn_pwned_by_checkpoint",))


def test_checkpoint_with_pickle_payload_is_refused(tiny_model, tmp_path):
    import os

    marker = "/tmp/salmonn_pwned_by_checkpoint"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"x": _Payload()}}, fh)
    torch.save({"model": {}, "evil": _Payload()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused|damaged"):
            read_state_dict(p)
    assert not os.path.exists(marker)
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|damaged"):
        read_state_dict(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(tmp_path / "evil2.pth")


# ---------------------------------------------------------------- LoRA scale
def _logits(model, embeds, mask):
    return model.llama_model(inputs_embeds=embeds, attention_mask=mask).logits


def test_lora_scale_zero_is_base_model_and_scale_matches_merged(tiny_model):
    m = tiny_model
    audio = m.encode_audio(tone(1.5)).embeds
    embeds, mask, _ = m.assemble([audio], [m.prompt.conversation(["Hello?"])])
    with torch.no_grad():
        with lora_scale(m.llama_model, 0.0):
            zero = _logits(m, embeds, mask)
        with m.llama_model.disable_adapter():
            base = _logits(m, embeds, mask)
        assert torch.equal(zero, base)
        s = 2.5
        with lora_scale(m.llama_model, s):
            scaled = _logits(m, embeds, mask)
        # reference: the base weights with W + s * B @ A merged by hand
        saved = {}
        for layer in lora_layers(m.llama_model):
            w = layer.base_layer.weight
            saved[layer] = w.detach().clone()
            w.add_(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        with m.llama_model.disable_adapter():
            merged = _logits(m, embeds, mask)
        for layer, w in saved.items():
            layer.base_layer.weight.copy_(w)
    torch.testing.assert_close(scaled, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scaled, base, atol=1e-3)
    # the stored weights were never modified by changing the scale
    assert all(layer.scaling["default"] == m.cfg.lora.scaling for layer in lora_layers(m.llama_model))


def test_prompt_layout_bos_halves_audio(tiny_model):
    m = tiny_model
    text = m.prompt.conversation(["Describe the audio."])
    assert text == "USER: <Speech><SpeechHere></Speech> Describe the audio.\nASSISTANT:"
    before, after = m.prompt.split(text)
    tok = m.tokenizer
    assert before == [tok.bos_token_id] + tok("USER: <Speech>", add_special_tokens=False).input_ids
    assert after == tok("</Speech> Describe the audio.\nASSISTANT:", add_special_tokens=False).input_ids
    audio = torch.randn(5, m.llm_dtype.itemsize and m.llama_model.config.hidden_size)
    embeds, mask, _ = m.assemble([audio], [text])
    table = m.llama_model.get_input_embeddings()
    assert embeds.shape[1] == len(before) + 5 + len(after)
    torch.testing.assert_close(embeds[0, : len(before)], table(torch.tensor(before)))
    torch.testing.assert_close(embeds[0, len(before): len(before) + 5], audio)
    torch.testing.assert_close(embeds[0, len(before) + 5:], table(torch.tensor(after)))
    with pytest.raises(PromptError, match="exactly once"):
        m.prompt.split("USER: Describe the audio.\nASSISTANT:")


def test_multi_turn_prompt_places_audio_once(tiny_pipeline):
    text = tiny_pipeline.prompt_text("And the pitch?", history=[("What do you hear?", "A tone.")])
    assert text.count("<SpeechHere>") == 1
    assert text.startswith("USER: <Speech><SpeechHere></Speech> What do you hear?\nASSISTANT: A tone.</s>")
    assert text.endswith("USER: And the pitch?\nASSISTANT:")
    # user-typed placeholder tags are removed, never spliced twice
    assert tiny_pipeline.prompt_text("<SpeechHere> hi <Speech>").count("<SpeechHere>") == 1


# ---------------------------------------------------------------- audio front end
def test_front_end_resamples_and_mixes_channels(tmp_path):
    stereo = tone(2.0, rate=44100, channels=2)
    path = tmp_path / "s.wav"
    sf.write(path, stereo, 44100)
    audio = prepare_audio(path)
    assert audio.wav.dtype == np.float32 and audio.wav.ndim == 1
    assert len(audio.wav) == 32000
    assert (audio.original_rate, audio.original_channels) == (44100, 2)
    # channels are averaged, not channel 0 only
    left_only = np.stack([stereo[:, 0], np.zeros(len(stereo), np.float32)], axis=1)
    half = prepare_audio((44100, left_only)).wav
    np.testing.assert_allclose(half, audio.wav / 2, atol=1e-4)
    # int16 from Gradio's numpy form
    pcm = (tone(1.0, rate=8000) * 32767).astype(np.int16)
    assert len(prepare_audio((8000, pcm)).wav) == 16000


def test_long_audio_is_chunked_and_cut(tiny_model):
    wav = tone(75.0, freq=220)
    tokens = tiny_model.encode_audio(wav)
    assert tokens.embeds.shape[0] == 3 * 88
    assert tokens.cross_attentions.shape[0] == 3 * 88
    assert list(tokens.chunk_starts) == [0, 30, 60]
    assert tokens.window_starts[88] == pytest.approx(30.0)
    audio = prepare_audio((16000, tone(400.0)), max_seconds=300)
    assert audio.seconds == pytest.approx(300.0) and audio.cut_seconds == pytest.approx(100.0)
    assert "cut" in audio.describe()


def test_trim_to_audio_keeps_only_windows_with_sound(tiny_cfg):
    model = SALMONN.from_config(tiny_cfg.replace(trim_to_audio=True))
    enc = model.speech_encoder
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():   # the length-limited encoder path is the stock encoder at full length
        torch.testing.assert_close(enc(mel, frames=1500), enc(mel))
        assert enc(mel, frames=51).shape == (1, 51, enc.dim)
    assert model.encoder_frames(3 * 16000) == 9 * 17
    assert model.encode_audio(tone(3.0)).embeds.shape[0] == math.ceil(3.0 * 50 / 17)
    assert model.encode_audio(tone(31.0)).embeds.shape[0] == 88 + math.ceil(50 / 17)


# ---------------------------------------------------------------- decoding and caching
def test_score_matches_teacher_forcing_loss(tiny_pipeline):
    wav = tone(1.0, freq=700)
    scores = tiny_pipeline.score(wav, "Describe the audio.", "a dog says hello", [0.0, 4.0])
    assert [s.lora_scale for s in scores] == [0.0, 4.0]
    m = tiny_pipeline.model
    target = m.tokenizer("a dog says hello", add_special_tokens=False).input_ids + [m.tokenizer.eos_token_id]
    text = tiny_pipeline.prompt_text("Describe the audio.")
    with lora_scale(m.llama_model, 4.0), torch.no_grad():
        loss = m.loss([m.encode_audio(wav).embeds], [text], [target])
    assert scores[1].nll == pytest.approx(float(loss), rel=1e-4)
    assert len(scores[0].logprobs) == len(target) and scores[0].nll != pytest.approx(scores[1].nll)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tiny_cfg, tiny_pipeline, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_text("this is not audio at all")
    with pytest.raises(AudioError, match="not audio|damaged|decoded"):
        tiny_pipeline.prepare(junk)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        tiny_pipeline.prepare(empty)
    with pytest.raises(AudioError, match="zero length|no samples"):
        tiny_pipeline.prepare((16000, np.zeros(0, np.float32)))
    with pytest.raises(AudioError, match="too short"):
        tiny_pipeline.prepare((16000, np.zeros(160, np.float32)))
    with pytest.raises(AudioError, match="NaN"):
        tiny_pipeline.prepare((16000, np.full(16000, np.nan, np.float32)))
    with pytest.raises(AudioError, match="not found"):
        tiny_pipeline.prepare(tmp_path / "missing.wav")
    with pytest.raises(PromptError, match="empty"):
        tiny_pipeline.answer(tone(1.0), "   ", generate=GREEDY)
    with pytest.raises(ConfigError, match="whisper_path does not exist"):
        SALMONN.from_config(tiny_cfg.replace(whisper_path=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="ckpt does not exist"):
        SALMONN.from_config(tiny_cfg.replace(ckpt=str(tmp_path / "none.pth")))
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        SALMONN.from_config(tiny_cfg.replace(llama_path=str(tmp_path)))
    # the pipeline still answers after all that
    assert tiny_pipeline.answer(tone(1.0), "Describe.", generate=GREEDY).num_tokens > 0


# ---------------------------------------------------------------- official config
OFFICIAL_YAML = """\
model:
  llama_path: "/x/vicuna"
  whisper_path: "/x/whisper"
  beats_path: "/x/beats.pt"
  ckpt: "/x/salmonn_v1.pth"
  freeze_whisper: True
  freeze_beats: True
  use_speech_Qformer: True
  num_speech_query_token: 1
  window_level_Qformer: True
  second_per_window: 0.333333
  second_stride: 0.333333
  speech_llama_proj_model: ""
  freeze_speech_llama_proj: False
  lora: True
  lora_rank: 8
  lora_alpha: 32
  lora_dropout: 0.1
  multi_prompt: True
  prompt_template: "USER: {}\\nASSISTANT:"
  max_txt_len: 300
  end_sym: "</s>"
  low_resource: False
  device_8bit: 0
generate:
  max_new_tokens: 200
  num_beams: 4
  do_sample: False
  min_length: 1
  temperature: 1.0
  top_p: 0.9
  repetition_penalty: 1.0
  length_penalty: 1.0
"""


def test_official_decode_config_is_accepted(tmp_path):
    path = tmp_path / "decode_config.yaml"
    path.write_text(OFFICIAL_YAML)
    cfg = load_config(path, overrides=["model.ckpt=/y/other.pth", "generate.num_beams=1", "model.lora_alpha=16"])
    assert (cfg.llama_path, cfg.whisper_path, cfg.beats_path) == ("/x/vicuna", "/x/whisper", "/x/beats.pt")
    assert cfg.ckpt == "/y/other.pth" and cfg.generate.num_beams == 1
    assert cfg.lora.rank == 8 and cfg.trained_lora_scale == 2.0
    assert cfg.prompt_template == "USER: {}\nASSISTANT:"
    assert cfg.qformer.window_frames == 17 and cfg.qformer.num_query_tokens == 1
    path.write_text(OFFICIAL_YAML.replace("lora_rank: 8", "lora_rnak: 8"))
    with pytest.raises(ConfigError, match="lora_rnak"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
