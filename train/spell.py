"""The spelling stage, alone and long, with its learning curve:

    python -m train.spell --data runs_h/speech_a runs_h/speech_b --eval runs_h/everyday \
        --runs runs_h/spell --steps 1500 --eval-every 100 [--init assets/salmonn-tiny-activation.safetensors]

The Q-Former, projection and CTC head learn, with the CTC loss against the LLM's own embedding table
(``trainer.ctc_alignment_loss``), to spell the transcripts of the ASR rows of ``--data`` folders
(``train.hearing_data`` or ``train.make_data`` output). The LLM never runs, so a step costs a fraction
of an LLM step and the stage can see each clip many times. It starts from ``--init`` weights with their
CTC head (the recipe's stage 0 starts from scratch).

With ``--keep-sounds`` (``train.make_data`` folders) the audio tokens of their sound and music clips
are held near the ``--init`` model's (the trainer's anchor term, ``--keep-weight``): spelling speech
alone moves the Q-Former away from sounds, and the LLM stage after it did not bring them back.

Every ``--eval-every`` steps (and before the first) it measures the CTC-greedy spelling WER on the
``--eval`` folder (the held-out engine's everyday set, ``hearing_data --everyday-eval``), per voice, and on
a sample of training clips, under two vocabularies: the training transcripts' tokens (what the loss
scores) and the whole LLM table. The curve goes to ``<runs>/curve.json``; the weights with the best
held-out WER so far to ``<runs>/best.safetensors`` (a full checkpoint: LoRA as ``--init`` had it).
Resumable: rerun the same command. ``--steps 0`` only measures the ``--init`` weights.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from model.defaults import CHECKPOINTS
from train.evaluate import OPEN_EVAL_SENTENCES, wer
from train.recipe import build_model, cached_tokens, log, sound_clip_paths
from train.trainer import Trainer, TrainConfig, ctc_spell, encode_clips, load_annotations, reference_tokens

START = time.perf_counter()     # curve points say when they were measured


def asr_rows(folders: list[Path], limit: int = 0, seed: int = 0) -> list[dict]:
    """The ASR rows of the folders' stage2_instruct.json; with `limit`, a fixed random subset of that many."""
    rows = [r for f in folders for r in load_annotations(f / "stage2_instruct.json") if r["task"] == "asr"]
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def spelling_wer(model, head, tokens: list[torch.Tensor], rows: list[dict], vocab: torch.Tensor | None) -> dict:
    """Corpus WER of what `tokens` spell, overall, per engine voice and per sentence set (the fixed
    everyday sentences of the evaluation, or others)."""
    hyp = ctc_spell(model, head, tokens, vocab)
    refs = [r["text"] for r in rows]
    by_voice: dict[str, list[int]] = {}
    by_set: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_voice.setdefault(r["labels"]["speech"]["voice"], []).append(i)
        by_set.setdefault("fixed" if r["text"] in OPEN_EVAL_SENTENCES else "other", []).append(i)

    def part(groups: dict[str, list[int]]) -> dict[str, float]:
        return {k: wer([refs[i] for i in idx], [hyp[i] for i in idx]) for k, idx in sorted(groups.items())}

    return {"wer": wer(refs, hyp), "by_voice": part(by_voice), "by_set": part(by_set),
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyp))[:3]]}


class Curve:
    """Spelling WER on held-out and training clips at each measured step, kept in curve.json."""

    def __init__(self, model, trainer: Trainer, held: tuple[list[dict], dict], seen: tuple[list[dict], dict],
                 path: Path, best: Path):
        self.model, self.trainer, self.held, self.seen, self.path, self.best = model, trainer, held, seen, path, best
        self.points = json.loads(path.read_text())["points"] if path.is_file() else []

    def measure(self, step: int) -> dict:
        m, t = self.model, self.trainer
        held_tokens = cached_tokens(m, self.held[0], self.held[1])
        point = {"step": step, "seconds": round(time.perf_counter() - START, 1),
                 "held_out": spelling_wer(m, t.ctc_head, held_tokens, self.held[0], t.ctc_vocab),
                 "held_out_full_vocab": spelling_wer(m, t.ctc_head, held_tokens, self.held[0], None),
                 "train": spelling_wer(m, t.ctc_head, cached_tokens(m, *self.seen), self.seen[0], t.ctc_vocab)["wer"]}
        if t.history:
            point["loss"] = t.history[-1]["loss"]
        best = min((p["held_out"]["wer"] for p in self.points), default=float("inf"))
        self.points.append(point)
        self.path.write_text(json.dumps({"points": self.points}, indent=1))
        if point["held_out"]["wer"] < best and step > 0:
            shutil.copyfile(t.out / "latest.safetensors", self.best)
        log(f"  spelling WER at step {step}: held out {point['held_out']['wer']:.1%} "
            f"(full vocabulary {point['held_out_full_vocab']['wer']:.1%}; by voice "
            + ", ".join(f"{v} {w:.0%}" for v, w in point["held_out"]["by_voice"].items())
            + f"), training clips {point['train']:.1%}")
        m.train()       # Trainer.train set training mode once; measuring switched it off
        m.speech_encoder.eval()
        return point



def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="folders with stage2_instruct.json (ASR rows are used)")
    ap.add_argument("--eval", required=True, help="held-out folder with eval.json (hearing_data --everyday-eval)")
    ap.add_argument("--runs", required=True, help="output folder (checkpoints, curve.json; resumable)")
    ap.add_argument("--init", default=str(CHECKPOINTS["activation"]), help="starting weights (with their CTC head)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak LR (50 warm-up steps, cosine to a tenth)")
    ap.add_argument("--feature-masking", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=0, help="use only this many training clips (data-size curves)")
    ap.add_argument("--keep-sounds", nargs="*", default=[],
                    help="train.make_data folders whose sound and music clips keep their --init audio tokens")
    ap.add_argument("--keep-weight", type=float, default=1.0, help="weight of that anchor term")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folders, runs, held_dir = [Path(d) for d in args.data], Path(args.runs), Path(args.eval)
    keep = [Path(d) for d in args.keep_sounds]
    for f in folders + keep + [held_dir]:
        if not (f / ("eval.json" if f == held_dir else "stage2_instruct.json")).is_file():
            raise SystemExit(f"{f}: not a data folder (make it with python -m train.hearing_data)")
    model = build_model(torch.float32, ckpt=args.init)
    if model.ctc_head is None:
        raise SystemExit(f"--init {args.init}: carries no CTC head (python -m train.ctc_head gives it one)")
    rows = asr_rows(folders, args.limit, args.seed)
    feats = {}
    for f in folders:      # one cache per folder, so runs over other subsets reuse it
        paths = sorted({r["path"] for r in rows if Path(r["path"]).is_relative_to(f.resolve())})
        feats.update(encode_clips(model, paths, cache_file=f / "features.pt", log=log))
    anchors = {}
    if keep:
        paths = sound_clip_paths([r for f in keep for r in load_annotations(f / "stage2_instruct.json")])
        if not paths:
            raise SystemExit(f"--keep-sounds {' '.join(args.keep_sounds)}: no sound or music clips there")
        for f in keep:
            feats.update(encode_clips(model, [p for p in paths if Path(p).is_relative_to(f.resolve())],
                                      cache_file=f / "features.pt", log=log))
        anchors = reference_tokens(model, feats, paths)
    held = load_annotations(held_dir / "eval.json")
    held_feats = encode_clips(model, [r["path"] for r in held], cache_file=held_dir / "features.pt", log=log)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, init_lr=args.lr, min_lr=args.lr / 10,
                      warmup_start_lr=1e-5, warmup_steps=50, max_txt_len=96, seed=args.seed, log_every=25,
                      save_every=args.eval_every, ctc_weight=1.0, lm_weight=0.0, feature_masking=args.feature_masking,
                      anchor_weight=args.keep_weight if anchors else 0.0)
    trainer = Trainer(model, rows, feats, cfg, runs, log=log, ctc_head=model.ctc_head, anchors=anchors)
    log(f"spelling stage: {len(rows)} clips, {len(trainer.ctc_vocab)} token types, {cfg.steps} steps x {cfg.batch_size}"
        + (f"; {len(anchors)} sound clips keep their audio tokens (weight {args.keep_weight})" if anchors else ""))
    resumed = trainer.resume()
    seen = random.Random(args.seed + 1).sample(rows, min(80, len(rows)))
    curve = Curve(model, trainer, (held, held_feats), (seen, feats), runs / "curve.json", runs / "best.safetensors")
    if not resumed:
        runs.mkdir(parents=True, exist_ok=True)
        curve.points = []
        curve.measure(0)
    trainer.train(on_save=curve.measure)
    return {"points": curve.points}


if __name__ == "__main__":
    main()
