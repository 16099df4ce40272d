"""Give trained SALMONN-tiny weights a CTC head, and choose the CTC weight on a development set:

    python -m train.ctc_head --ckpt assets/salmonn-tiny-instruction.safetensors \
        --ckpt assets/salmonn-tiny-activation.safetensors --dev-data data2 --weights 0.3,0.5,0.7

The recipe's checkpoints carry the head their stage 2 trained (``model/ctc.py``); weights trained
before that do not. The head (a blank direction and a scale) is fitted alone to the audio tokens of
training ASR clips (``trainer.fit_ctc_head``: Q-Former, projection and LLM untouched) and written
into every given file, which must share one Q-Former and projection (stage 3 trains LoRA only).

``--dev-data`` then measures CTC-guided transcription (4 beams, trained LoRA scale, ``ctc.CANDIDATES``
LLM candidates) on the held-out ASR clips of other folders whose sentences are not in the evaluation set
(another ``make_data`` seed's template sentences; ``hearing_data --everyday-dev``'s everyday ones), so
the weight the app suggests is not chosen on the numbers it reports: the weight with the lowest mean
WER over the sets. ``--record`` writes the measurement into the training summary the model card reads:

    python -m train.ctc_head --keep-head --ckpt assets/salmonn-tiny-activation.safetensors \
        --dev-data data2 everyday_dev --record assets/eval/training.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint import CTC_PREFIX, read_state_dict
from model.ctc import CANDIDATES, CTCHead


def shared_audio_path(paths: list[Path]) -> None:
    """Raise unless the files hold the same Q-Former and projection (what the head reads)."""
    first = read_state_dict(paths[0])
    for path in paths[1:]:
        other = read_state_dict(path)
        differ = [k for k, v in first.items() if "lora" not in k and not k.startswith(CTC_PREFIX)
                  and (k not in other or not torch.equal(v, other[k]))]
        if differ:
            raise SystemExit(f"{path} and {paths[0]} differ in {differ[0]} (and {len(differ) - 1} more): "
                             "one head cannot serve both; give them one at a time.")


def write_head(path: Path, head: CTCHead, note: dict) -> None:
    """Add (or replace) the head's tensors in a safetensors checkpoint, keeping its other tensors and metadata."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(CTC_PREFIX)}
    state.update({CTC_PREFIX + n: p.detach().float().contiguous() for n, p in head.named_parameters()})
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    meta["ctc_head"] = json.dumps(note)
    save_file(state, str(path), metadata=meta)


def fit_head(model, rows: list[dict], steps: int, seed: int) -> tuple[CTCHead, dict]:
    """A head fitted to the model's audio tokens of `rows` (ASR rows) as heard at inference."""
    from model.audio import prepare_audio
    from train.trainer import ctc_targets, fit_ctc_head

    table = model.llama_model.get_input_embeddings().weight
    tokens = [model.encode_audio(prepare_audio(r["path"]).wav, output_attentions=False).embeds for r in rows]
    head = CTCHead(table.shape[1])
    before, after = fit_ctc_head(head, tokens, ctc_targets(model.tokenizer, rows, 96), table, steps=steps, seed=seed)
    return head, {"clips": len(rows), "steps": steps, "loss_before": round(before, 4), "loss_after": round(after, 4)}


def dev_rows(dev_data: Path, eval_data: Path) -> list[dict]:
    """Held-out ASR rows of `dev_data` whose sentences the evaluation set (`eval_data`) never speaks."""
    from train.trainer import load_annotations

    tested = {r["text"] for r in load_annotations(eval_data / "eval.json") if r["task"] == "asr"}
    return [r for r in load_annotations(dev_data / "eval.json") if r["task"] == "asr" and r["text"] not in tested]


def choose_weight(sets: list[dict]) -> float | None:
    """The guided CTC weight (not 0) with the lowest mean WER over the development sets."""
    guided = [k for k in sets[0]["wer"] if float(k)]
    return float(min(guided, key=lambda k: sum(d["wer"][k] for d in sets) / len(sets))) if guided else None


def record_development(path: Path, development: dict) -> None:
    """Put the development measurement into the training summary's CTC head record (`model_card` reads it)."""
    summary = json.loads(path.read_text())
    summary.setdefault("ctc_head", {})["development"] = development
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def guided_wer(model, rows: list[dict], weights: list[float], beams: int = 4) -> dict[str, float]:
    """WER at the trained LoRA scale with each CTC weight (0 = plain beam search)."""
    from model.audio import prepare_audio
    from train.evaluate import generate, wer

    tokens = [model.encode_audio(prepare_audio(r["path"]).wav, output_attentions=False).embeds for r in rows]
    refs, prompts = [r["text"] for r in rows], [r["prompt"] for r in rows]
    return {f"{w:g}": wer(refs, generate(model, tokens, prompts, model.cfg.trained_lora_scale, 48, beams=beams,
                                         ctc_weight=w)) for w in weights}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", required=True, help="trained weights (safetensors; repeatable)")
    ap.add_argument("--data", default="data", help="make_data folder: its training ASR clips fit the head, "
                                                   "its eval.json is the evaluation set")
    ap.add_argument("--clips", type=int, default=600, help="training ASR clips to fit the head on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-head", action="store_true", help="do not fit: use the head the first file carries")
    ap.add_argument("--dev-data", nargs="+", default=[],
                    help="folders (make_data with another seed, hearing_data --everyday-dev) whose held-out ASR clips "
                         "choose the weight")
    ap.add_argument("--weights", default="0,0.3,0.5,0.7", help="CTC weights to measure on the development sets")
    ap.add_argument("--record", default="", metavar="TRAINING_JSON",
                    help="write the development measurement and the chosen weight into this training summary "
                         "(assets/eval/training.json, which python -m train.model_card reads)")
    args = ap.parse_args(argv)
    from model.defaults import bundled_config
    from model.salmonn import SALMONN
    from train.trainer import load_annotations

    paths = [Path(p) for p in args.ckpt]
    for p in paths:
        if not p.is_file() or p.suffix != ".safetensors":
            raise SystemExit(f"--ckpt {p}: expected an existing .safetensors checkpoint")
    shared_audio_path(paths)
    data = Path(args.data)
    result: dict = {}
    torch.manual_seed(args.seed)
    model = SALMONN.from_config(bundled_config(paths[-1]))
    t0 = time.perf_counter()
    if not args.keep_head:
        rows = [r for r in load_annotations(data / "stage2_instruct.json") if r["task"] == "asr"]
        rows = random.Random(args.seed).sample(rows, min(args.clips, len(rows)))
        head, note = fit_head(model, rows, args.steps, args.seed)
        note["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"CTC head fitted on {note['clips']} clips: loss {note['loss_before']} -> {note['loss_after']} "
              f"({note['seconds']} s)")
        for p in paths:
            write_head(p, head, note)
            print(f"  written into {p}")
        model.ctc_head = head
        result["fit"] = note
    elif model.ctc_head is None:
        raise SystemExit(f"--keep-head: {paths[-1]} carries no CTC head")
    if args.dev_data:
        weights = [float(w) for w in args.weights.split(",")]
        sets = []
        for folder in args.dev_data:
            rows = dev_rows(Path(folder), data)
            if not rows:
                raise SystemExit(f"--dev-data {folder}: no held-out ASR clips outside the evaluation set")
            sets.append({"folder": Path(folder).name, "clips": len(rows),
                         "wer": {k: round(v, 4) for k, v in guided_wer(model, rows, weights).items()}})
        chosen = choose_weight(sets)
        result["development"] = {"checkpoint": paths[-1].as_posix(), "beams": 4, "top_tokens": CANDIDATES,
                                 "sets": sets, "chosen": chosen}
        heads = " | ".join(f"{d['folder']} ({d['clips']} clips)" for d in sets)
        print(f"| CTC weight | {heads} |\n|---|{'---|' * len(sets)}")
        for w in sets[0]["wer"]:
            cells = " | ".join(f"{d['wer'][w]:.1%}" for d in sets)
            print(f"| {w} | {cells} |")
        print(f"lowest mean WER: {chosen} (4 beams, {paths[-1].name})")
        if args.record:
            record_development(Path(args.record), result["development"])
            print(f"recorded in {args.record}")
    return result


if __name__ == "__main__":
    main()
