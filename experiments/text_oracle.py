"""The reading ceiling: how well SALMONN-tiny's LLM side answers the attribute questions when it is told
in words what the audio holds.

    python -m experiments.text_oracle [--data data] [--ckpt WEIGHTS] [--steps 100] [--out DIR]

The model is SALMONN-tiny itself (same prompt template, LoRA, loss and greedy decoding as
``train.evaluate``), but each clip's audio tokens are replaced by the LLM's own input embeddings of the
clip's true one-sentence description (``tasks.describe`` of the row's labels, as in ``clips.jsonl``: e.g.
"A high-pitched tone beeps four times."),
i.e. perfect hearing in the LLM's own language. It reports held-out attribute accuracy (the evaluation's
questions and rule) before training and after every ``--eval-every`` steps of LoRA-only training on the
training QA rows (answer tokens only, AdamW, warm-up then cosine as the recipe).

It splits the attribute gap (53 % at scale 4 against the 80 % target) into hearing and
reading: when the words are given, a LoRA of our size learns to answer most questions within a hundred
steps, so the missing part is the audio tokens' interface to the LLM, not the LLM. ``--ckpt`` starts from
trained weights (their LoRA) instead of a fresh LoRA.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from train.evaluate import attribute_scores, select
from train.tasks import describe
from train.trainer import TrainConfig, answer_targets, load_annotations, lr_at, param_groups


def word_tokens(model, text: str) -> torch.Tensor:
    """The LLM's input embeddings of `text`: what the audio tokens would be if they were those words."""
    return model.embed_ids(model.tokenizer(text, add_special_tokens=False).input_ids)


def qa_rows(data: Path, name: str) -> list[dict]:
    """The QA rows of one make_data annotation file, each with its clip's description."""
    rows = [r for r in load_annotations(data / name) if r["task"] == "QA"]
    for r in rows:
        r["description"] = describe(r["labels"])
    return rows


def accuracy(model, rows: list[dict], scale: float) -> tuple[float, dict, list[str]]:
    """(share right, right/asked by question kind, answers) with the descriptions as audio tokens."""
    with torch.no_grad():
        tokens = [word_tokens(model, r["description"]) for r in rows]
    return attribute_scores(model, tokens, rows, scale)


def train_lora(model, rows: list[dict], cfg: TrainConfig, on_eval=None, eval_every: int = 0) -> list[float]:
    """LoRA-only training on (description, question) -> short answer; returns the loss of each step."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, lora_only=True), lr=cfg.init_lr)
    losses = []
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = [rows[rng.randrange(len(rows))] for _ in range(cfg.batch_size)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model.loss([word_tokens(model, r["description"]) for r in batch],
                          [model.prompt.conversation([r["prompt"]]) for r in batch],
                          answer_targets(model.tokenizer, batch, cfg.max_txt_len))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_eval and eval_every and (step % eval_every == 0 or step == cfg.steps):
            model.eval()
            on_eval(step, sum(losses[-eval_every:]) / len(losses[-eval_every:]))
            model.train()
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data", help="make_data output (stage2_instruct.json, eval.json)")
    ap.add_argument("--ckpt", default="", help="start from these trained weights' LoRA (default: a fresh LoRA)")
    ap.add_argument("--qa", type=int, default=165, help="held-out questions (the evaluation's sample)")
    ap.add_argument("--scale", type=float, default=4.0, help="LoRA scale to answer at (training uses alpha/rank, 4)")
    ap.add_argument("--llm-dtype", dest="dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the frozen LLM's dtype, as the recipe's")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2.5e-4)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", default="", help="folder for oracle.json (accuracies and answers)")
    args = ap.parse_args(argv)

    from train.recipe import build_model, frozen_llm_dtype

    data = Path(args.data)
    if not all((data / name).is_file() for name in ("stage2_instruct.json", "eval.json")):
        raise SystemExit(f"{data}: no make_data output (run python -m train.make_data --out {data})")
    train_rows = qa_rows(data, "stage2_instruct.json")
    held = select(qa_rows(data, "eval.json"), "QA", args.qa)
    model = build_model(frozen_llm_dtype(args.dtype), ckpt=args.ckpt)
    model.eval()
    report: dict = {"ckpt": args.ckpt or "fresh LoRA", "questions": len(held), "scale": args.scale, "steps": []}
    t0 = time.perf_counter()

    def record(step: int, loss: float | None) -> None:
        acc, by_kind, answers = accuracy(model, held, args.scale)
        report["steps"].append({"step": step, "loss": loss, "accuracy": acc, "by_kind": by_kind,
                                "seconds": round(time.perf_counter() - t0, 1)})
        report["answers"] = [{"q": r["Q"], "ref": r["text"], "answer": a} for r, a in zip(held, answers)]
        print(f"step {step}: held-out attribute accuracy {acc:.3f}" + ("" if loss is None else f", loss {loss:.3f}")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    record(0, None)
    if args.steps > 0:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, init_lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=max(1, args.steps // 10), warmup_start_lr=args.lr / 100)
        train_lora(model, train_rows, cfg, record, args.eval_every)
    print("| question kind | before | after |\n|---|---|---|")
    first, last = report["steps"][0]["by_kind"], report["steps"][-1]["by_kind"]
    for kind in last:
        print(f"| {kind} | {first[kind]['correct']}/{first[kind]['asked']} | {last[kind]['correct']}/{last[kind]['asked']} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "oracle.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
