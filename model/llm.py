"""The language model side: a local decoder-only LLM (Vicuna/LLaMA first) with peft LoRA on q/v,
the run-time LoRA scale, and the official prompt wrapping.

LoRA computes y = W x + s * B A x. peft keeps s per layer in `layer.scaling[adapter]` and multiplies
by it in every forward, so changing it there changes the model instantly without touching W, A or B.
A LoraScale gives each batch row its own scale (one forward for a whole scale sweep).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import LoRAConfig
from .errors import ConfigError, PromptError

PLACEHOLDER = "<SpeechHere>"
AUDIO_PREFIX = "<Speech><SpeechHere></Speech> "


def load_llm(path: str | Path, dtype: torch.dtype, device_map: str | None = None, load_in_8bit: bool = False):
    """Load an HF causal LM and its tokenizer from a local directory (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"LLM path {path} is not a Hugging Face model directory (no config.json).")
    kwargs: dict = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ConfigError("8-bit loading needs the bitsandbytes package (pip install bitsandbytes) and a CUDA GPU.") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs.setdefault("device_map", "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - report any loader failure with its path
        raise ConfigError(f"Could not load the LLM from {path}: {err}") from None
    if tokenizer.pad_token is None:
        # As the official code: a [PAD] token for batching. We do not resize the embeddings, so its
        # id lies outside the LLM's vocabulary and can never be generated.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    for module in llm.parameters():
        module.requires_grad_(False)
    return llm.eval(), tokenizer


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(task_type="CAUSAL_LM", r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")
    return get_peft_model(llm, lcfg)


def lora_layers(llm: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in llm.modules() if isinstance(m, LoraLayer)]


class LoraScale:
    """Per-row LoRA scales (a [B, 1, 1] float32 tensor) that peft can multiply by on any device.

    peft computes `lora_B(lora_A(x)) * scaling`. A tensor there must sit on that layer's device (an
    LLM split across GPUs has several), and in the LLM's fp16 it would round (1.3 -> 1.2998), so a
    batched sweep would not equal one-by-one answers. So each device gets its own float32 copy
    (`on`), and the product is taken in float32 and rounded once to the activation's dtype: exactly
    what `x * 1.3` (a Python float) computes. `set` changes the values in place, so a captured CUDA
    graph that reads these tensors needs no re-capture for a new scale."""

    def __init__(self, values: Sequence[float] | torch.Tensor):
        self.values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1, 1, 1).clone()
        self._on: dict[torch.device, _DeviceScale] = {}

    def __len__(self) -> int:
        return self.values.shape[0]

    def on(self, device: torch.device | str) -> "_DeviceScale":
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = _DeviceScale(self, self.values.to(device))
        return self._on[device]

    def set(self, values: Sequence[float] | torch.Tensor) -> None:
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1)
        if values.shape != self.values.shape:
            raise ValueError(f"{values.shape[0]} LoRA scales for {len(self)} rows")
        self.values.copy_(values)
        for scale in self._on.values():
            if scale.tensor.device.type != "meta":
                scale.tensor.copy_(self.values)

    def floats(self) -> list[float]:
        return self.values.flatten().tolist()


class _DeviceScale:
    """One device's copy of a LoraScale, as peft's `scaling[adapter]` (only multiplied by)."""

    def __init__(self, parent: LoraScale, tensor: torch.Tensor):
        self.parent, self.tensor = parent, tensor

    def __rmul__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.tensor
        if scale.device != x.device:     # a layer whose weights accelerate moves in at run time (offload)
            scale = self.parent.on(x.device).tensor
        return torch.mul(x, scale).to(x.dtype)

    __mul__ = __rmul__

    def __repr__(self) -> str:
        return f"LoraScale({self.parent.floats()} on {self.tensor.device})"


def _layer_device(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


def current_scale(llm: nn.Module, rows: int, layers: list[nn.Module] | None = None) -> list[float] | None:
    """The LoRA scale every row runs at now (floats; no device sync), or None without LoRA layers."""
    layers = lora_layers(llm) if layers is None else layers
    if not layers or not layers[0].scaling:
        return None
    value = next(iter(layers[0].scaling.values()))
    if isinstance(value, _DeviceScale):
        values = value.parent.floats()
        return values * rows if len(values) == 1 else values
    return [float(value)] * rows


@contextlib.contextmanager
def lora_scale(llm: nn.Module, scale: float | LoraScale | None, layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Temporarily run LoRA at `scale`: a float, or a LoraScale (one scale per batch row; each layer
    gets the copy on its own device). None leaves the current scale (alpha/rank unless changed) as
    it is. `layers`: the LLM's LoRA layers when the caller has them (finding them walks every module)."""
    if scale is None:
        yield
        return
    if isinstance(scale, torch.Tensor):
        scale = LoraScale(scale)
    layers = lora_layers(llm) if layers is None else layers
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            value = scale.on(_layer_device(layer)) if isinstance(scale, LoraScale) else scale
            for name in layer.scaling:
                layer.scaling[name] = value
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.scaling.update(old)


@dataclass
class PromptFormat:
    """Official prompt layout: [BOS] + tokens(before) + audio tokens + tokens(after).

    The template (e.g. "USER: {}\\nASSISTANT:") is filled with "<Speech><SpeechHere></Speech> prompt";
    the text is split at <SpeechHere> and the halves are tokenized separately without special tokens.
    """
    tokenizer: object
    template: str = "USER: {}\nASSISTANT:"
    add_bos: bool = True
    turn_separator: str = ""
    followup_template: str = ""

    def conversation(self, questions: Sequence[str], answers: Sequence[str] = ()) -> str:
        """Text of a chat about one audio; the audio placeholder goes into the first question."""
        if not questions:
            raise PromptError("The prompt is empty.")
        text = ""
        eos = self.tokenizer.eos_token or ""
        joiner = "" if self.template.endswith((" ", "\n")) else " "
        for i, question in enumerate(questions):
            if i == 0 and PLACEHOLDER not in question:
                question = AUDIO_PREFIX + question.strip()
            template = self.followup_template if i and self.followup_template else self.template
            text += template.format(question)
            if i < len(answers):
                text += joiner + answers[i].strip() + eos + self.turn_separator
        return text

    def split(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of the text before and after the audio placeholder."""
        count = text.count(PLACEHOLDER)
        if count != 1:
            raise PromptError(f"The prompt must contain the audio placeholder {PLACEHOLDER} exactly once "
                              f"(found {count}); e.g. 'USER: <Speech><SpeechHere></Speech> Describe the audio.'")
        before, after = text.split(PLACEHOLDER)
        enc = self.tokenizer
        ids_before = enc(before, add_special_tokens=False).input_ids
        ids_after = enc(after, add_special_tokens=False).input_ids
        if self.add_bos and enc.bos_token_id is not None:
            ids_before = [enc.bos_token_id] + ids_before
        return ids_before, ids_after


def quantize_int8_cpu(llm: nn.Module) -> int:
    """8-bit LLM weights on CPU: every frozen Linear (LoRA's base layers, the other projections and
    the LM head) becomes torch's dynamic-int8 Linear with one scale per output channel; the LoRA
    matrices, the embeddings and the norms stay in float. Decoding one token reads every weight once,
    so on a CPU it is memory-bound and a quarter of fp32's bytes makes it faster. Returns the number
    of layers converted."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {name: per_channel_dynamic_qconfig for name, module in llm.named_modules()
             if type(module) is nn.Linear and "lora_" not in name}
    if not names:
        return 0
    if next(llm.parameters()).device.type != "cpu":
        raise ConfigError("CPU 8-bit weights need the LLM on the CPU; on a GPU use --8bit (bitsandbytes).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # torch.ao's deprecation notes; the kernels are what we need
        quantize_dynamic(llm, names, dtype=torch.qint8, inplace=True)
    return len(names)
