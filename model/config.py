"""Plain dataclass configuration for SALMONN, and the official `decode_config.yaml` reader.

Defaults are the official SALMONN v1 values (Whisper large-v2 + BEATs + Vicuna, window Q-Former
of 2 layers / 768 hidden / 1 query per 17-frame window, LoRA r=8 alpha=32 on q/v).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import ConfigError, SettingsError


# Whisper encodes a 30 s chunk into 1500 frames (50 per second), as the official code hard-codes.
CHUNK_SECONDS = 30
ENCODER_FRAMES = 1500


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 1          # audio tokens per window
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    dropout: float = 0.1

    @property
    def window_frames(self) -> int:
        return round(ENCODER_FRAMES * self.second_per_window / CHUNK_SECONDS)

    @property
    def stride_frames(self) -> int:
        return round(ENCODER_FRAMES * self.second_stride / CHUNK_SECONDS)


@dataclass
class LoRAConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scaling(self) -> float:
        """The trained LoRA scaling factor alpha/rank (4.0 for the official checkpoints)."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings (frozen: a change is a new object, `dataclasses.replace`); defaults follow the
    official decode_config.yaml. `Pipeline.check_generate` checks them against `GENERATE_LIMITS`."""
    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    min_length: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0                     # 0 = off
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None
    # ours: joint CTC / LLM decoding for transcription (0 = off); needs a checkpoint with a CTC head
    ctc_weight: float = 0.0
    # words never emitted (as vLLM's `bad_words`): each as written, lower-case, capitalised and upper-case,
    # with and without a leading space
    bad_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limit:
    """The accepted range of one setting, as users see it (its label names it in messages)."""
    label: str
    low: float
    high: float
    integer: bool = False

    def check(self, value):
        """`value` as an int or float within the range; anything else (a string, NaN, 2.5 beams) is
        refused with a message naming the setting and its range, never silently changed."""
        kind = "a whole number" if self.integer else "a number"
        refused = SettingsError(f"{self.label} must be {kind} from {self.low:g} to {self.high:g} (got {value!r}).")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise refused
        exact = int(value) if isinstance(value, (int, np.integer)) else float(value)
        if not (math.isfinite(exact) and self.low <= exact <= self.high):
            raise refused
        if self.integer:
            if exact != int(exact):
                raise refused
            return int(exact)
        return float(exact)


# One source of truth for each decoding setting's range: the pipeline's check, its messages and the
# app's controls all read this table.
GENERATE_LIMITS: dict[str, Limit] = {
    "num_beams": Limit("Beams", 1, 10, integer=True),
    "max_new_tokens": Limit("Max new tokens", 1, 2048, integer=True),
    "min_length": Limit("Min length", 0, 2048, integer=True),
    "temperature": Limit("Temperature", 0.01, 5.0),
    "top_p": Limit("Top-p", 0.01, 1.0),
    "top_k": Limit("Top-k", 0, 1000, integer=True),
    "repetition_penalty": Limit("Repetition penalty", 1.0, 3.0),
    "length_penalty": Limit("Length penalty", -10.0, 10.0),
    "ctc_weight": Limit("CTC weight", 0.0, 1.0),
    "seed": Limit("Seed", 0, 2**63 - 1, integer=True),
}
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 256, 50     # the bad_words list: each word is a few token sequences per step


@dataclass
class SALMONNConfig:
    name: str = "SALMONN"
    whisper_path: str = ""             # local HF Whisper directory (any size)
    beats_path: str = ""               # BEATs .pt; empty = speech encoder only
    llama_path: str = ""               # local HF decoder-only LLM directory
    ckpt: str = ""                     # SALMONN checkpoint (.pth or .safetensors); empty = untrained
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    prompt_template: str = "USER: {}\nASSISTANT:"
    # Multi-turn chat: template of later turns (empty = prompt_template) and the text between an
    # answer's EOS and the next turn.
    followup_template: str = ""
    turn_separator: str = ""
    add_bos: bool = True               # official: the BOS embedding starts the sequence
    chunk_seconds: float = 30.0        # Whisper's window; longer audio is encoded chunk by chunk
    max_audio_seconds: float = 300.0   # audio beyond this is cut (and the user told)
    min_audio_seconds: float = 0.1     # shorter audio is refused as unusable
    # Audio that starts abruptly gets quiet prepended up to this many seconds (0 = off, official). A
    # Q-Former trained only on clips with a lead-in misreads a first word spoken at t = 0.
    lead_in_seconds: float = 0.0
    # Keep only the windows that cover real audio (the official model always keeps 88 per chunk).
    trim_to_audio: bool = False
    device: str = "auto"               # auto = cuda if available else cpu
    dtype: str = "auto"                # auto = float32 on CPU, float16 on GPU
    device_map: str | None = None      # e.g. "auto" to split the LLM over several GPUs
    load_in_8bit: bool = False

    @property
    def trained_lora_scale(self) -> float:
        return self.lora.scaling if self.lora.enabled else 0.0

    def replace(self, **changes: Any) -> "SALMONNConfig":
        return dataclasses.replace(self, **changes)


# Official decode_config.yaml keys (section "model") that we map; the rest are training-only
# switches accepted without effect at inference.
_MODEL_KEYS = {
    "llama_path": ("llama_path",), "whisper_path": ("whisper_path",), "beats_path": ("beats_path",),
    "ckpt": ("ckpt",), "prompt_template": ("prompt_template",),
    "lora": ("lora", "enabled"), "lora_rank": ("lora", "rank"), "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "second_per_window": ("qformer", "second_per_window"), "second_stride": ("qformer", "second_stride"),
    "num_speech_query_token": ("qformer", "num_query_tokens"),
    "low_resource": ("load_in_8bit",),
}
_IGNORED_MODEL_KEYS = {
    "freeze_whisper", "freeze_beats", "use_speech_Qformer", "freeze_speech_QFormer", "window_level_Qformer",
    "speech_llama_proj_model", "freeze_speech_llama_proj", "multi_prompt", "prompt_path", "test_prompt_path",
    "max_txt_len", "end_sym", "device_8bit", "token", "only_preprocessor", "arch", "model_type",
}


def _typed(current: Any, value: Any) -> Any:
    """A YAML value as the type of the setting it replaces."""
    if isinstance(current, bool) and not isinstance(value, bool):
        return str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(current, (int, float)) and not isinstance(current, bool) and value is not None:
        return type(current)(value)
    return value


def _set(cfg: SALMONNConfig, path: tuple[str, ...], value: Any) -> None:
    obj = cfg
    for part in path[:-1]:
        obj = getattr(obj, part)
    setattr(obj, path[-1], _typed(getattr(obj, path[-1]), value))


def parse_override(text: str) -> tuple[str, Any]:
    """`model.ckpt=/x.pth` -> ("model.ckpt", "/x.pth"); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.key=value (e.g. model.ckpt=/path/salmonn.pth)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def config_from_dict(data: dict, overrides: list[str] | None = None, base: SALMONNConfig | None = None) -> SALMONNConfig:
    """Build a config from the official YAML structure ({"model": ..., "generate": ...})."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for item in overrides or []:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"Override {item!r} needs a section: model.<key> or generate.<key>")
        data.setdefault(section, {})[name] = value
    cfg = dataclasses.replace(base) if base else SALMONNConfig()
    cfg.qformer = dataclasses.replace(cfg.qformer)
    cfg.lora = dataclasses.replace(cfg.lora)
    gen_fields = {f.name for f in dataclasses.fields(GenerateConfig)}
    top_fields = {f.name for f in dataclasses.fields(SALMONNConfig)} - {"qformer", "lora", "generate"}
    for section, values in data.items():
        if section == "model":
            for key, value in (values or {}).items():
                if key in _MODEL_KEYS:
                    _set(cfg, _MODEL_KEYS[key], value)
                elif key in top_fields:
                    _set(cfg, (key,), value)
                elif key not in _IGNORED_MODEL_KEYS:
                    raise ConfigError(f"Unknown key model.{key} in the config; known keys: {sorted(_MODEL_KEYS) + sorted(top_fields)}")
        elif section == "generate":
            for key, value in (values or {}).items():
                if key not in gen_fields:
                    raise ConfigError(f"Unknown key generate.{key}; known keys: {sorted(gen_fields)}")
                cfg.generate = dataclasses.replace(cfg.generate, **{key: _typed(getattr(cfg.generate, key), value)})
        # Other official sections (run, datasets) only matter for training; accepted silently.
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> SALMONNConfig:
    """Read an official decode_config.yaml (safe YAML loader; no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config {path} must be a mapping with a 'model' section")
    return config_from_dict(data, overrides)
