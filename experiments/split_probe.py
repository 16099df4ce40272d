"""Where does held-out ASR error come from: new voices or new sentences?

    python -m experiments.split_probe --ckpt assets/salmonn-tiny-instruction.safetensors [--scale 4 --n 40]

Five cells of clean espeak speech, greedy decoding: clips the model was trained on; fresh renderings of
training sentences in training voices; the same sentences in held-out voices; held-out sentences in
training voices; both held out (what the evaluation measures). The gaps between the cells say whether
more voices or more sentences would help most: on the earlier weights a new voice cost as much as a
new sentence, which led to ``make_data --more-voices`` and ``--speed-perturb`` (docs/EXPERIMENTS.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from train import synth

CELLS = ("seen clips", "train sentences, train voices", "train sentences, held-out voices",
         "held-out sentences, train voices", "held-out sentences, held-out voices")


def split_wer(model, data: Path, n: int = 40, scale: float = 4.0) -> dict[str, float]:
    """WER per cell (``CELLS``) on up to `n` clips each, from the annotations under `data`."""
    from model.audio import prepare_audio
    from train.evaluate import generate, wer
    from train.trainer import load_annotations

    def rows(name: str) -> list[dict]:
        return [r for r in load_annotations(data / name) if r["task"] == "asr"]

    train = [r for r in rows("stage2_instruct.json") if r["labels"]["type"] == "speech"]   # clean clips only
    held = rows("eval.json")   # only their sentences are used, spoken clean
    if not train or not held:
        raise ValueError(f"{data}: no ASR rows in stage2_instruct.json / eval.json")
    prompt = train[0]["prompt"]
    seen = train[::30][:n]   # fixed strides: the numbers in docs/EXPERIMENTS.md are reproducible
    sentences = {"train": list(dict.fromkeys(r["text"] for r in train))[::7][:n],
                 "eval": list(dict.fromkeys(r["text"] for r in held))[:n]}

    def measure(texts: list[str], audio: list[np.ndarray]) -> float:
        tokens = [model.encode_audio(x, output_attentions=False).embeds for x in audio]
        return wer(texts, generate(model, tokens, [prompt] * len(texts), scale, 48))

    def spoken(texts: list[str], split: str) -> list[np.ndarray]:
        rng = np.random.default_rng(1)   # the same voices, rates and pitches for every checkpoint
        pool = synth.voices(split)
        out = []
        for text in texts:
            x, _ = synth.speech(text, rng, voice=pool[int(rng.integers(len(pool)))])
            out.append(synth.pad(x, rng))
        return out

    result = {CELLS[0]: measure([r["text"] for r in seen], [prepare_audio(r["path"]).wav for r in seen])}
    for cell, (sent, voice) in zip(CELLS[1:], [("train", "train"), ("train", "eval"), ("eval", "train"), ("eval", "eval")]):
        result[cell] = measure(sentences[sent], spoken(sentences[sent], voice))
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="trained SALMONN-tiny weights (safetensors)")
    ap.add_argument("--data", default="data", help="a make_data folder (its training and held-out annotations)")
    ap.add_argument("--scale", type=float, default=4.0, help="LoRA scale")
    ap.add_argument("--n", type=int, default=40, help="clips per cell")
    args = ap.parse_args(argv)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"--ckpt {args.ckpt}: no such file")
    if not all((Path(args.data) / f).is_file() for f in ("stage2_instruct.json", "eval.json")):
        raise SystemExit(f"--data {args.data}: no make_data output there (python -m train.make_data --out {args.data})")
    from model.defaults import bundled_config
    from model.salmonn import SALMONN

    result = split_wer(SALMONN.from_config(bundled_config(args.ckpt)), Path(args.data), args.n, args.scale)
    print("| clips | WER |\n|---|---|")
    for cell, value in result.items():
        print(f"| {cell} | {value * 100:.1f} % |")
    return result


if __name__ == "__main__":
    main()
