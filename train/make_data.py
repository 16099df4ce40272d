"""Generate the synthetic SALMONN training / evaluation set in one command.

    python -m train.make_data --out data --seed 0 [--scale 1.0] [--workers 2]
                              [--sentences data/sentences.json --open-share 0.5]
                              [--types speech speech_audio] [--more-voices] [--speed-perturb 0.1]

Writes (paths inside the JSON files are relative to the --out folder; use
``train.trainer.load_annotations`` to get absolute ones):

    <out>/audio/{train,eval}/<id>.wav   16 kHz mono PCM16
    <out>/stage1_pretrain.json          asr + audiocaption + music_description (train clips)
    <out>/stage2_instruct.json          all tasks (train clips)
    <out>/eval.json                     all tasks (held-out clips: unseen voices and sentences)
    <out>/clips.jsonl                   one line per clip: labels + one-sentence description
    <out>/meta.json                     seed, scale and counts

Each clip has its own random generator seeded from (seed, split, index), so the
output is identical for a given seed whatever the number of worker processes. ``--sentences`` (a corpus
written by ``python -m train.sentences``) makes a share of the spoken sentences open-vocabulary ones;
without it the output is what it always was for that seed. ``--more-voices`` speaks the training clips in
a larger pool of espeak-ng variants; the held-out clips are the same either way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from train import synth, tasks

TRAIN_CLIPS, EVAL_CLIPS = 3000, 300
CLIP_TYPES = {"speech": 0.30, "sound": 0.22, "music": 0.18, "speech_audio": 0.15, "co_reasoning": 0.15}
SPLIT_CODE = {"train": 0, "eval": 1}
MAX_SECONDS = 30.0
# Open-vocabulary sentences (train/eval split), set by ``generate`` before the workers fork.
_OPEN: dict = {"corpus": None, "share": 0.0}
# The larger training voice pool (``synth.voices(more=True)``), also set before the workers fork.
_VOICES: dict = {"more": False, "perturb": 0.0}
# Co-reasoning backgrounds favour sounds with countable / directional answers (the harder questions).
_W = np.array([2.0 if k in synth.COUNTABLE or k == "sweep" else 1.0 for k in synth.SOUND_KINDS])
COREASON_KIND_P = _W / _W.sum()


def plan(split: str, n: int, seed: int, types: list[str] | None = None) -> list[dict]:
    """Clip specs for a split: exact type proportions (of `types` only, renormalised, if given),
    shuffled deterministically."""
    shares = {t: s for t, s in CLIP_TYPES.items() if types is None or t in types}
    total = sum(shares.values())
    counts = {t: int(round(share / total * n)) for t, share in shares.items()}
    counts[next(iter(counts))] += n - sum(counts.values())  # rounding leftovers
    types = [t for t, c in counts.items() for _ in range(c)]
    np.random.default_rng([seed, SPLIT_CODE[split], 99]).shuffle(types)
    return [{"split": split, "index": i, "type": t, "id": f"{split}_{i:05d}_{t}", "seed": seed}
            for i, t in enumerate(types)]


def speed_for(split: str, rng: np.random.Generator) -> float:
    """A speed-perturbation factor for training speech (``--speed-perturb``), on a 0.02 grid; 1.0, with
    no draw from `rng`, for held-out clips or without the flag, so their output never changes."""
    width = _VOICES["perturb"]
    if split != "train" or width <= 0:
        return 1.0
    return round(float(rng.uniform(1 - width, 1 + width)) * 50) / 50


def synth_clip(spec: dict) -> tuple[np.ndarray, dict]:
    """Audio and labels for one clip spec (pure function of the spec)."""
    split, t = spec["split"], spec["type"]
    rng = np.random.default_rng([spec["seed"], SPLIT_CODE[split], spec["index"]])
    labels: dict = {"type": t}
    if t == "speech":
        x, labels["speech"] = synth.speech(synth.sentence_for(split, rng, **_OPEN), rng, split=split,
                                           more_voices=_VOICES["more"], speed=speed_for(split, rng))
        x = synth.pad(x, rng, 0.1, 0.6)
    elif t == "sound":
        x, labels["sound"] = synth.sound(rng)
        x = synth.pad(x, rng, 0.1, 0.5)
    elif t == "music":
        x, labels["sound"] = synth.music(rng)
        x = synth.pad(x, rng, 0.0, 0.3)
    else:
        source = "music" if rng.random() < 0.3 else "sound"
        if t == "co_reasoning":
            kind = str(rng.choice(synth.SOUND_KINDS, p=COREASON_KIND_P)) if source == "sound" else None
            bg, labels["sound"] = synth.background_for(rng, source, 3.0, kind)
            labels["question"] = synth.spoken_question(labels["sound"], split, rng)
            text = labels["question"]["text"]
        else:
            text = synth.sentence_for(split, rng, **_OPEN)
        sp, labels["speech"] = synth.speech(text, rng, split=split, more_voices=_VOICES["more"],
                                            speed=speed_for(split, rng))
        if t != "co_reasoning":
            bg, labels["sound"] = synth.background_for(rng, source, len(sp) / synth.SR)
        sp = synth.pad(sp, rng, 0.2, 0.6)  # background is audible before/after the speech
        x, info = synth.mix_at_snr(sp, bg, rng.uniform(5, 15), rng)
        labels["snr_db"] = info["snr_db"]
        x = synth.pad(x, rng, 0.0, 0.2)
    x = synth.normalize(x, rng.uniform(0.3, 0.95))  # loudness variety
    if len(x) > MAX_SECONDS * synth.SR:
        raise RuntimeError(f"clip {spec['id']} is {len(x) / synth.SR:.1f} s, over the {MAX_SECONDS} s limit")
    labels["duration"] = synth.seconds(x)
    return x, labels


def render(job: tuple[dict, str]) -> dict:
    """Worker: synthesize, write the WAV, build the examples. Returns the clip record."""
    spec, out = job
    x, labels = synth_clip(spec)
    rel = f"audio/{spec['split']}/{spec['id']}.wav"
    sf.write(Path(out) / rel, x, synth.SR, subtype="PCM_16")
    ex_rng = np.random.default_rng([spec["seed"], SPLIT_CODE[spec["split"]], spec["index"], 1])
    return {"id": spec["id"], "split": spec["split"], "path": rel, "type": spec["type"],
            "duration": labels["duration"], "labels": labels, "description": tasks.describe(labels),
            "examples": tasks.examples_for(labels, ex_rng, spec["split"])}


def annotation(records: list[dict], keep=lambda task: True) -> dict:
    """Official SALMONN layout {"annotation": [{path, text, task, Q}]} plus prompt, labels, id."""
    rows = [{"path": r["path"], "text": e["text"], "task": e["task"], "Q": e["Q"], "prompt": e["prompt"],
             "labels": r["labels"], "id": r["id"]}
            for r in records for e in r["examples"] if keep(e["task"])]
    return {"annotation": rows}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def generate(out: Path, seed: int = 0, scale: float = 1.0, workers: int = 2, sentences: str | None = None,
             open_share: float = 0.5, types: list[str] | None = None, more_voices: bool = False,
             speed_perturb: float = 0.0) -> dict:
    """Generate everything under ``out``; returns the counts written to meta.json."""
    _OPEN.update(corpus=synth.load_sentences(sentences) if sentences else None, share=open_share if sentences else 0.0)
    _VOICES.update(more=more_voices, perturb=speed_perturb)
    n_train = max(len(CLIP_TYPES), round(TRAIN_CLIPS * scale))
    n_eval = max(len(CLIP_TYPES), round(EVAL_CLIPS * scale))
    specs = plan("train", n_train, seed, types) + plan("eval", n_eval, seed, types)
    for split in SPLIT_CODE:
        folder = out / "audio" / split
        shutil.rmtree(folder, ignore_errors=True)  # no stale clips from an earlier, larger run
        folder.mkdir(parents=True)
    jobs = [(s, str(out)) for s in specs]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            records = pool.map(render, jobs, chunksize=8)  # map keeps input order
    else:
        records = [render(j) for j in jobs]

    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    write_json(out / "stage1_pretrain.json", annotation(train, lambda task: task in tasks.STAGE1_TASKS))
    write_json(out / "stage2_instruct.json", annotation(train))
    write_json(out / "eval.json", annotation(evals))
    with open(out / "clips.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "examples"}, ensure_ascii=False) + "\n")

    def task_counts(rs, keep=lambda task: True):
        return dict(sorted(Counter(e["task"] for r in rs for e in r["examples"] if keep(e["task"])).items()))

    corpus = {s for side in (_OPEN["corpus"] or {}).values() for s in side}
    open_used = sum(1 for r in records if r["labels"]["type"] in ("speech", "speech_audio")
                    and r["labels"]["speech"]["text"] in corpus)
    meta = {"seed": seed, "scale": scale, "types": types, "more_voices": more_voices, "speed_perturb": speed_perturb,
            "sentences": {"corpus": sentences, "open_share": _OPEN["share"], "open_clips": open_used} if sentences else None,
            "clips": {"train": len(train), "eval": len(evals)},
            "clip_types": {s: dict(sorted(Counter(r["type"] for r in rs).items())) for s, rs in
                           (("train", train), ("eval", evals))},
            "hours": {s: round(sum(r["duration"] for r in rs) / 3600, 3) for s, rs in (("train", train), ("eval", evals))},
            "examples": {"stage1_pretrain": task_counts(train, lambda task: task in tasks.STAGE1_TASKS),
                         "stage2_instruct": task_counts(train), "eval": task_counts(evals)}}
    write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0 = 3000 train + 300 eval clips")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (output does not depend on it)")
    ap.add_argument("--sentences", default=None, help="open-vocabulary sentence corpus (python -m train.sentences)")
    ap.add_argument("--open-share", type=float, default=0.5, help="share of spoken sentences taken from --sentences")
    ap.add_argument("--types", nargs="+", choices=list(CLIP_TYPES), default=None,
                    help="only these clip types (e.g. speech, for a large speech set for CTC alignment)")
    ap.add_argument("--more-voices", action="store_true",
                    help=f"speak training clips in {len(synth.EXTRA_MALE_VARIANTS) + len(synth.EXTRA_FEMALE_VARIANTS)} "
                         "more espeak-ng voice variants (the held-out voices stay the same)")
    ap.add_argument("--speed-perturb", type=float, default=0.0, metavar="W",
                    help="speed-perturb training speech by a factor in [1-W, 1+W], e.g. 0.1: new vocal-tract "
                         "lengths, i.e. more voices (held-out clips are never perturbed)")
    args = ap.parse_args(argv)
    if args.scale <= 0:
        ap.error("--scale must be > 0")
    if args.sentences and not Path(args.sentences).is_file():
        ap.error(f"--sentences {args.sentences}: no such file (write it with python -m train.sentences)")
    if not 0.0 <= args.speed_perturb <= 0.3:
        ap.error("--speed-perturb must be between 0 and 0.3")
    if not 0.0 <= args.open_share <= 1.0:
        ap.error("--open-share must be between 0 and 1")
    start = time.time()
    meta = generate(Path(args.out), args.seed, args.scale, max(1, args.workers), args.sentences, args.open_share, args.types,
                    args.more_voices, args.speed_perturb)
    print(json.dumps(meta, indent=1))
    print(f"generated in {time.time() - start:.1f} s with {args.workers} worker(s) -> {args.out}", file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
