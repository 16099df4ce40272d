"""Load and save SALMONN's trainable weights in the official key layout.

The official loader uses `load_state_dict(strict=False)`, which silently ignores a wrong or
partial file. We account for every key: a required key missing, an unknown key or a shape
mismatch is an error that names it. Files are read without running pickled code
(`torch.load(weights_only=True)` or safetensors).

One optional part is ours: a CTC head (``ctc_head.blank``, ``ctc_head.log_scale``; see ``ctc.py``)
that SALMONN-tiny checkpoints carry for CTC-guided transcription. A file without it loads as before
and leaves the model without a head.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import LoRAConfig
from .errors import CheckpointError

# (ours, official) name prefixes of the window Q-Former, checked in order; "{n}" stands for a layer
# number, and a name not ending in "." must match whole.
_QFORMER_NAMES = [
    ("window_qformer.qformer.layernorm.", "speech_Qformer.bert.embeddings.LayerNorm."),
    ("window_qformer.qformer.encoder.layer.{n}.attention.attention.", "speech_Qformer.bert.encoder.layer.{n}.attention.self."),
    ("window_qformer.qformer.encoder.layer.{n}.crossattention.attention.",
     "speech_Qformer.bert.encoder.layer.{n}.crossattention.self."),
    ("window_qformer.qformer.encoder.layer.", "speech_Qformer.bert.encoder.layer."),
    ("window_qformer.query_tokens", "speech_query_tokens"),
    ("window_qformer.ln_speech.", "ln_speech."),
    ("window_qformer.ln_audio.", "ln_audio."),
]


def _rules(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    """(source, target) name prefixes -> (pattern, replacement) pairs for `re.sub`."""
    rules = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(re.escape("{n}"), r"(\d+)") + ("" if source.endswith(".") else "$")
        rules.append((re.compile(pattern), target.replace("{n}", r"\1")))
    return rules


_QFORMER_RULES = _rules(_QFORMER_NAMES)
_OFFICIAL_RULES = _rules([(official, ours) for ours, official in _QFORMER_NAMES])
# Buffers and aliases the official training code writes that carry nothing we need.
_IGNORABLE = [
    re.compile(r"\.position_ids$"),
    re.compile(r"\.rotary_emb\.inv_freq$"),
    re.compile(r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$"),
]


def to_official(name: str) -> str:
    for pattern, repl in _QFORMER_RULES:
        if pattern.search(name):
            return pattern.sub(repl, name)
    return name


def from_official(name: str) -> str:
    for pattern, repl in _OFFICIAL_RULES:
        if pattern.search(name):
            return pattern.sub(repl, name)
    return name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (official `{'model': ...}` or a bare state dict) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise CheckpointError(f"Checkpoint {path} is empty.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"Checkpoint {path} is not a valid safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (it could not be unpickled).") from None
        raise CheckpointError(
            f"Checkpoint {path} was refused: it contains Python objects that would run code when loaded "
            f"(only tensors and plain containers are accepted).") from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {path} is damaged or not a PyTorch file: {str(err).splitlines()[0]}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"Checkpoint {path} does not hold a state dict of tensors (expected {{'model': {{name: tensor}}}}).")
    return obj


CTC_PREFIX = "ctc_head."


def _ctc_head_problems(model, head: dict[str, torch.Tensor]) -> list[str]:
    width = model.llama_model.get_input_embeddings().weight.shape[1]
    want = {"blank": (width,), "log_scale": ()}
    if set(head) != set(want):
        return [f"ctc_head: expected the keys {sorted(CTC_PREFIX + k for k in want)}, got {sorted(CTC_PREFIX + k for k in head)}"]
    return [f"{CTC_PREFIX}{k}: checkpoint {tuple(head[k].shape)} vs model {want[k]} (the LLM's embedding width)."
            for k in want if tuple(head[k].shape) != want[k]]


def _explain_width(model, ours: str, expected, got) -> str:
    if "crossattention" in ours and ours.endswith(("key.weight", "value.weight")):
        speech = model.speech_encoder.dim
        audio = model.audio_encoder.dim if model.audio_encoder is not None else 0
        return (f" The checkpoint's Q-Former reads {got[1]}-wide encoder frames but this model gives "
                f"{expected[1]} (Whisper {speech} + BEATs {audio}). "
                + ("Give the BEATs checkpoint (beats_path): this SALMONN checkpoint was trained with it."
                   if got[1] > expected[1] else "This checkpoint was trained without BEATs; leave beats_path empty."))
    if ours.endswith("query_tokens") and len(got) == 3 and len(expected) == 3 and got[2] == expected[2]:
        return (f" The checkpoint makes {got[1]} audio token(s) per window, this model {expected[1]}: "
                f"set model.num_speech_query_token={got[1]} (or use weights trained for {expected[1]}).")
    return ""


def load_checkpoint(model, path: str | Path) -> list[str]:
    """Load the trainable weights into `model`; returns the names of ignored (known, unused) keys."""
    weights, ignored = checkpoint_weights(model, path)
    set_trainable(model, weights)
    return ignored


def set_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy matched weights (ours -> tensor, as `match_weights` returns) into the model in place.
    A CTC head in `weights` goes into the model's head (made if it has none); weights without one
    leave the model without a head."""
    from .ctc import CTCHead

    params = model.trainable_parameters()
    head = {k[len(CTC_PREFIX):]: v for k, v in weights.items() if k.startswith(CTC_PREFIX)}
    if not head:
        model.ctc_head = None
    elif model.ctc_head is None:
        model.ctc_head = CTCHead(head["blank"].shape[0])
    with torch.no_grad():
        for ours, tensor in weights.items():
            if not ours.startswith(CTC_PREFIX):
                params[ours].copy_(tensor)
        if head:
            for name, p in model.ctc_head.named_parameters():
                p.copy_(head[name])


def checkpoint_weights(model, path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`match_weights` of the file at `path`: checked against `model`, without touching it."""
    return match_weights(model, read_state_dict(path), path)


def match_weights(model, raw: dict[str, torch.Tensor], source: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict's trainable weights under our names, checked against `model` (every key
    accounted for, every shape matching) and cast to the dtype and device of the parameter each
    replaces, without touching the model; and the names of ignored (known, unused) keys.
    `source` names the state dict in errors."""
    params = model.trainable_parameters()
    ignored, unknown, mismatched, mapped, head = [], [], [], {}, {}
    for key, tensor in raw.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith(CTC_PREFIX):
            head[name[len(CTC_PREFIX):]] = tensor
            continue
        if any(p.search(name) for p in _IGNORABLE):
            ignored.append(key)
            continue
        ours = from_official(name)
        if ours not in params:
            unknown.append(key)
            continue
        expected = tuple(params[ours].shape)
        if tuple(tensor.shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {expected}."
                              + _explain_width(model, ours, expected, tuple(tensor.shape)))
            continue
        mapped[ours] = tensor
    missing = [to_official(n) for n in params if n not in mapped]
    if head:
        mismatched += _ctc_head_problems(model, head)
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched[:10]))
    if missing:
        problems.append(f"{len(missing)} required key(s) missing, e.g.:\n  " + "\n  ".join(missing[:10]))
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s), e.g.:\n  " + "\n  ".join(unknown[:10]))
    if problems:
        raise CheckpointError(f"Checkpoint {source} does not match this model ({model.cfg.name}):\n" + "\n".join(problems))
    weights = {ours: tensor.to(dtype=params[ours].dtype, device=params[ours].device) for ours, tensor in mapped.items()}
    weights.update({CTC_PREFIX + k: v.detach().float().cpu() for k, v in head.items()})
    return weights, ignored


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable weights under official key names, fp32 on CPU (and the CTC head, if the model has one)."""
    state = {to_official(n): p.detach().float().cpu().contiguous() for n, p in model.trainable_parameters().items()}
    if model.ctc_head is not None:
        state.update({CTC_PREFIX + n: p.detach().float().cpu().contiguous() for n, p in model.ctc_head.named_parameters()})
    return state


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata `save_checkpoint` wrote in a `.safetensors` file's header, tensors unread."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def lora_record(lora: LoRAConfig) -> dict:
    """A LoRA's rank, alpha and adapted layers, as a checkpoint records them and the model card shows them."""
    return {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}


def checkpoint_lora(path: str | Path, lora: LoRAConfig) -> LoRAConfig:
    """`lora` with the rank, alpha and target modules a `.safetensors` file says its LoRA was trained with
    (the "lora" entry `save_checkpoint` writes); as given for any other file. The shapes alone would not
    do: they say the rank but not alpha, hence not the trained scale."""
    if Path(path).suffix != ".safetensors":
        return lora
    try:
        saved = json.loads(checkpoint_metadata(path).get("lora", "null"))
    except (OSError, SafetensorError, ValueError):
        return lora           # a damaged file is reported by the loader, naming what is wrong
    if not isinstance(saved, dict):
        return lora
    try:
        return dataclasses.replace(lora, rank=int(saved["rank"]), alpha=float(saved["alpha"]),
                                   target_modules=tuple(str(t) for t in saved["target_modules"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its LoRA description {saved!r} is unreadable ({err}).") from err


def loaded_config(cfg):
    """`cfg` (a SALMONNConfig) as `SALMONN.from_config` builds the model: with the LoRA its checkpoint
    records, when it records one."""
    return cfg.replace(lora=checkpoint_lora(cfg.ckpt, cfg.lora)) if cfg.ckpt else cfg


def save_checkpoint(model, path: str | Path, metadata: dict | None = None,
                    lora_dtype: torch.dtype = torch.float32) -> Path:
    """Write the trainable weights in the official layout: `.pth` as {'model': ...}, or `.safetensors`
    (with the LoRA's rank, alpha and targets, which `checkpoint_lora` reads back). `lora_dtype` stores the
    LoRA matrices narrower (bfloat16 halves a wide LoRA's share of the file); loading casts them back to
    the model's dtype."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(lora_dtype) if ".lora_" in k else v for k, v in trainable_state_dict(model).items()}
    if path.suffix == ".safetensors":
        if model.cfg.lora.enabled:
            metadata = {"lora": lora_record(model.cfg.lora), **(metadata or {})}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        save_file(state, str(path), metadata=meta)
    else:
        torch.save({"model": state}, path)
    return path
