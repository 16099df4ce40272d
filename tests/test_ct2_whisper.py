"""The CTranslate2 reader and the Whisper conversion (model/ct2_whisper.py), on a tiny model.bin the
test writes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ct2_whisper
from model.errors import CheckpointError

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
    variables, aliases = ct2_whisper.read_ct2(path, expected_spec="WhisperSpec")
    assert aliases == TIED
    assert set(variables) == set(original) | set(TIED)
    np.testing.assert_array_equal(variables["decoder/projection/weight"], original["decoder/embeddings/weight"])
    assert variables["decoder/num_heads"].shape == () and int(variables["decoder/num_heads"]) == HEADS
    assert variables["encoder/layer_0/self_attention/layer_norm/gamma"].dtype == np.float32
    assert variables["encoder/conv1/weight"].dtype == np.float16


def test_bfloat16_variables_are_widened():
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype("<u2")  # exact: these fit in bfloat16
    out = ct2_whisper._ct2_array(memoryview(bf16_bits.tobytes()), 5, [3])
    np.testing.assert_array_equal(out, values)


def test_tiny_whisper_converts_to_expected_tensors(tiny_bin):
    path, src = tiny_bin
    variables, _ = ct2_whisper.read_ct2(path)
    config, sd = ct2_whisper.ct2_whisper_to_hf(variables, {"suppress_ids": [1, 2], "suppress_ids_begin": [3]})

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
    ids = ct2_whisper.whisper_special_ids(tokenizer_json)
    assert ids["eos"] == 7 and ids["no_timestamps"] == 9
    assert ids["sot"] == 50257 and ids["prev_sot"] == 50360  # tiny.en defaults for the missing ones


def test_tiny_whisper_loads_strictly_and_generates(tiny_bin):
    from transformers import WhisperForConditionalGeneration

    config, sd = ct2_whisper.ct2_whisper_to_hf(ct2_whisper.read_ct2(tiny_bin[0])[0], {}, TINY_SPECIAL)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (1, 0, 0)
    model = WhisperForConditionalGeneration(config).eval()
    model.load_state_dict(sd, strict=True)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    features = torch.randn(1, MELS, 2 * SRC_POS)  # the encoder expects 2 frames per position
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([[1, 2]])).logits
    assert logits.shape == (1, 2, VOCAB) and torch.isfinite(logits).all()

    model.generation_config = ct2_whisper.whisper_generation_config(config, {}, TINY_SPECIAL)
    assert model.generation_config.is_multilingual is False
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=2, return_dict_in_generate=True).sequences
    assert ids[0, :2].tolist() == [1, 5]  # <|startoftranscript|> <|notimestamps|>, then new tokens


def test_untied_projection_is_kept(tmp_path):
    variables = tiny_whisper_variables()
    variables["decoder/projection/weight"] = np.ones((VOCAB, D), np.float16)
    config, sd = ct2_whisper.ct2_whisper_to_hf(ct2_whisper.read_ct2(write_ct2(tmp_path / "m.bin", variables, {}))[0])
    assert not config.tie_word_embeddings
    assert torch.equal(sd["proj_out.weight"], torch.ones(VOCAB, D))


def test_nonzero_key_bias_is_rejected(tmp_path):
    variables = tiny_whisper_variables()
    variables["encoder/layer_0/self_attention/linear_0/bias"][D] = 1.0
    parsed = ct2_whisper.read_ct2(write_ct2(tmp_path / "m.bin", variables, TIED))[0]
    with pytest.raises(CheckpointError, match="key bias"):
        ct2_whisper.ct2_whisper_to_hf(parsed)


def test_missing_and_unknown_variables_are_rejected(tmp_path):
    variables = tiny_whisper_variables()
    del variables["decoder/layer_0/ffn/linear_1/bias"]
    with pytest.raises(CheckpointError, match="ffn/linear_1/bias"):
        ct2_whisper.ct2_whisper_to_hf(variables)
    variables = tiny_whisper_variables() | {"encoder/extra/weight": np.zeros((2, 2), np.float16)}
    with pytest.raises(CheckpointError, match="does not know"):
        ct2_whisper.ct2_whisper_to_hf(variables)


@pytest.mark.parametrize("keep", [0, 3, 10, 0.5, -5])
def test_truncated_model_bin_is_a_checkpoint_error(tiny_bin, tmp_path, keep):
    data = tiny_bin[0].read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated|not a"):
        ct2_whisper.read_ct2(broken)


def test_foreign_or_wrong_model_bin_is_a_checkpoint_error(tiny_bin, tmp_path):
    foreign = tmp_path / "foreign.bin"
    foreign.write_text(json.dumps({"not": "a model"}) * 10)
    with pytest.raises(CheckpointError, match="format version"):
        ct2_whisper.read_ct2(foreign)
    with pytest.raises(CheckpointError, match="TransformerSpec"):
        ct2_whisper.read_ct2(write_ct2(tmp_path / "t.bin", {}, {}, spec="TransformerSpec"), expected_spec="WhisperSpec")
    trailing = tmp_path / "trailing.bin"
    trailing.write_bytes(tiny_bin[0].read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        ct2_whisper.read_ct2(trailing)
    with pytest.raises(CheckpointError, match="missing variable"):
        ct2_whisper.read_ct2(write_ct2(tmp_path / "a.bin", {}, {"x": "y"}))
    with pytest.raises(CheckpointError, match="Cannot read"):
        ct2_whisper.read_ct2(tmp_path / "absent.bin")
