"""Speech-only data for hearing everyday English: open-vocabulary sentences in several TTS engines and
many voices, and the held-out everyday evaluation set spoken by an engine never used for training.

    python -m train.sentences --fortunes --out runs_h/pool.json          # the sentence pool (never shipped)
    python -m train.hearing_data --out runs_h/speech --clips 6000 --engines espeak festival \
        --pool runs_h/pool.json [--template-share 0.2] [--noise-share 0.4] [--speed-perturb 0.1]
    python -m train.hearing_data --everyday-eval --out runs_h/everyday --pool runs_h/pool.json
    python -m train.hearing_data --everyday-dev 80 --out runs_h/everyday_dev --pool runs_h/pool.json

Training clips: a sentence from the pool's training side (``synth.sentence_split``: a content hash, so a
sentence is always on one side) or, for ``--template-share`` of them, a template sentence; spoken by one
of ``--engines`` (``engine`` or ``engine:weight``) in a random voice and rate, speed-perturbed, and for
``--noise-share`` of them mixed over a synthesized background at 0-20 dB SNR. flite (``engines.HELD_OUT``)
is refused here. The folder has the layout ``train.make_data`` writes (ASR rows only), so
``train.recipe --extra-data`` and ``train.spell`` read it.

The everyday evaluation set: the fixed everyday sentences of ``train.evaluate.OPEN_EVAL_SENTENCES``
plus ``--pool-eval`` sentences of the pool's held-out side, each spoken by flite in turn in its four
voices, with 0.3 s of quiet around it (the same input whether the model adds its lead-in or not).
Deterministic: the same pool gives the same clips. The development set (``--everyday-dev N``): N other
sentences of the pool's held-out side in the training engines' voices, for choosing decoding settings
(``model.defaults.CTC_WEIGHT``) without looking at the evaluation.
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

from train import engines, synth
from train.tasks import PROMPTS, full_prompt

_CFG: dict = {}      # set by ``generate`` before workers fork: pool, engines, shares
SNRS_DB = (0.0, 5.0, 10.0, 15.0, 20.0)


def parse_engines(items: list[str]) -> dict[str, float]:
    """["espeak", "festival:0.5"] -> {engine: share}, refusing the held-out engine and missing ones."""
    weights = {}
    for item in items:
        name, _, w = item.partition(":")
        if name == engines.HELD_OUT:
            raise ValueError(f"{name} is the held-out engine (the unseen-voice test set): never used for training")
        engines.require(name)
        weights[name] = float(w) if w else 1.0
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def training_clip(spec: dict) -> tuple[np.ndarray, dict]:
    """Audio and labels for one training clip (a pure function of the spec and the pool)."""
    rng = np.random.default_rng([spec["seed"], 7, spec["index"]])
    pool = _CFG["pool"]
    if not pool or rng.random() < _CFG["template_share"]:
        text = synth.sentence_for("train", rng)
    else:
        text = str(rng.choice(pool))
    names, shares = zip(*_CFG["engines"].items())
    engine = str(rng.choice(names, p=shares))
    width = _CFG["speed_perturb"]
    speed = round(float(rng.uniform(1 - width, 1 + width)) * 50) / 50 if width > 0 else 1.0
    x, speech = engines.speak(engine, text, rng, speed=speed)
    labels: dict = {"type": "speech", "speech": speech}
    x = synth.pad(x, rng, 0.1, 0.6)
    if rng.random() < _CFG["noise_share"]:
        bg, labels["sound"] = synth.background_for(rng, "sound", len(x) / synth.SR)
        x, info = synth.mix_at_snr(x, bg, float(rng.choice(SNRS_DB)), rng)
        labels["snr_db"] = info["snr_db"]
    x = synth.normalize(x, rng.uniform(0.3, 0.95))
    labels["duration"] = synth.seconds(x)
    return x, labels


def render(job: tuple[dict, str]) -> dict:
    spec, out = job
    x, labels = training_clip(spec)
    rel = f"audio/train/{spec['id']}.wav"
    sf.write(Path(out) / rel, x, synth.SR, subtype="PCM_16")
    return asr_row(rel, labels, spec["id"], PROMPTS["asr"][spec["index"] % len(PROMPTS["asr"])])


def asr_row(path: str, labels: dict, clip_id: str, prompt: str) -> dict:
    """An official-layout ASR annotation row (+ prompt, labels, id)."""
    return {"path": path, "text": labels["speech"]["text"], "task": "asr", "Q": "", "prompt": full_prompt(prompt),
            "labels": labels, "id": clip_id}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def pool_side(pool: str | None, split: str) -> list[str]:
    return synth.load_sentences(pool)[split] if pool else []


def generate(out: Path, clips: int, engine_items: list[str], pool: str | None = None, seed: int = 0,
             template_share: float = 0.2, noise_share: float = 0.4, speed_perturb: float = 0.1,
             workers: int = 1) -> dict:
    """Training clips under `out` (make_data layout, ASR rows only); returns meta.json's content."""
    _CFG.update(pool=pool_side(pool, "train"), engines=parse_engines(engine_items), template_share=template_share,
                noise_share=noise_share, speed_perturb=speed_perturb)
    folder = out / "audio" / "train"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = [({"index": i, "seed": seed, "id": f"train_{i:05d}_speech"}, str(out)) for i in range(clips)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as p:
            rows = p.map(render, jobs, chunksize=8)
    else:
        rows = [render(j) for j in jobs]
    for name in ("stage1_pretrain.json", "stage2_instruct.json"):
        write_json(out / name, {"annotation": rows})
    write_json(out / "eval.json", {"annotation": []})     # held-out data is the everyday set's, not here
    meta = {"seed": seed, "clips": len(rows), "pool": pool, "engines": _CFG["engines"],
            "template_share": template_share, "noise_share": noise_share, "speed_perturb": speed_perturb,
            "by_engine": dict(Counter(r["labels"]["speech"]["engine"] for r in rows)),
            "voices": len({(r["labels"]["speech"]["engine"], r["labels"]["speech"]["voice"]) for r in rows}),
            "hours": round(sum(r["labels"]["duration"] for r in rows) / 3600, 3)}
    write_json(out / "meta.json", meta)
    return meta


def everyday_sentences(pool: str | None, n_pool: int, seed: int = 0) -> list[str]:
    """The everyday evaluation sentences: the fixed ones, then `n_pool` of the pool's held-out side."""
    from train.evaluate import OPEN_EVAL_SENTENCES

    held = pool_side(pool, "eval")
    rng = np.random.default_rng(seed)
    picked = [held[i] for i in sorted(rng.choice(len(held), min(n_pool, len(held)), replace=False))] if held else []
    return list(OPEN_EVAL_SENTENCES) + picked


def everyday_eval(out: Path, pool: str | None = None, n_pool: int = 50, seed: int = 0) -> dict:
    """The held-out engine's everyday set under `out` (eval.json, audio/eval/); returns meta.json's content."""
    sentences, voices = everyday_sentences(pool, n_pool, seed), engines.voices(engines.HELD_OUT)
    speakers = [(engines.HELD_OUT, voices[i % len(voices)]) for i in range(len(sentences))]
    return _spoken_set(out, sentences, speakers, seed,
                       {"engine": engines.HELD_OUT, "pool": pool, "pool_sentences": len(sentences) - 30})


def everyday_dev(out: Path, pool: str, clips: int = 80, n_pool: int = 50, seed: int = 0) -> dict:
    """A development set for choosing decoding settings apart from the evaluation: `clips` sentences of the
    pool's held-out side that the everyday evaluation (same `n_pool` and `seed`) never speaks, in the
    training engines' voices in turn (the held-out engine stays unheard until the evaluation)."""
    taken = set(everyday_sentences(pool, n_pool, seed))
    free = [s for s in pool_side(pool, "eval") if s not in taken]
    if not free:
        raise ValueError(f"{pool}: no held-out sentences left beside the evaluation's")
    rng = np.random.default_rng([seed, 11])
    sentences = [free[i] for i in sorted(rng.choice(len(free), min(clips, len(free)), replace=False))]
    here = [e for e in engines.TRAIN_ENGINES if shutil.which(engines.PROGRAMS[e])]     # engines in turn, then a voice
    if not here:
        engines.require(engines.TRAIN_ENGINES[0])      # says what to install
    speakers = [(e, str(rng.choice(engines.voices(e)))) for e in (here[i % len(here)] for i in range(len(sentences)))]
    return _spoken_set(out, sentences, speakers, seed + 1, {"engines": sorted({e for e, _ in speakers}), "pool": pool})


def _spoken_set(out: Path, sentences: list[str], speakers: list[tuple[str, str]], seed: int, meta: dict) -> dict:
    """`sentences` spoken by `speakers` ((engine, voice) each) with 0.3 s of quiet around them, as
    out/eval.json + audio/eval/ (the same input whether the model adds its lead-in or not)."""
    folder = out / "audio" / "eval"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    quiet = np.zeros(int(0.3 * synth.SR), dtype=np.float32)
    rows = []
    for i, (text, (engine, voice)) in enumerate(zip(sentences, speakers)):
        x, speech = engines.speak(engine, text, np.random.default_rng([seed, i]), voice=voice)
        rel = f"audio/eval/everyday_{i:03d}_{voice.replace('+', '_')}.wav"
        sf.write(out / rel, np.concatenate([quiet, x, quiet]), synth.SR, subtype="PCM_16")
        rows.append(asr_row(rel, {"type": "speech", "speech": speech, "duration": speech["duration"] + 0.6},
                            rel.split("/")[-1][:-4], PROMPTS["asr"][0]))
    write_json(out / "eval.json", {"annotation": rows})
    meta = {**meta, "clips": len(rows), "by_voice": dict(Counter(r["labels"]["speech"]["voice"] for r in rows))}
    write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pool", default=None, help="sentence pool JSON (python -m train.sentences --fortunes)")
    ap.add_argument("--everyday-eval", action="store_true", help="build the held-out engine's everyday set instead")
    ap.add_argument("--everyday-dev", type=int, default=0, metavar="N",
                    help="build a development set instead: N held-out pool sentences the everyday set never speaks, "
                         "in the training engines' voices (for choosing decoding settings)")
    ap.add_argument("--pool-eval", type=int, default=50, help="everyday set: held-out pool sentences besides the fixed 30")
    ap.add_argument("--clips", type=int, default=6000)
    ap.add_argument("--engines", nargs="+", default=list(engines.TRAIN_ENGINES), metavar="ENGINE[:WEIGHT]")
    ap.add_argument("--template-share", type=float, default=0.2, help="share of template-grammar sentences")
    ap.add_argument("--noise-share", type=float, default=0.4, help="share of clips over a background")
    ap.add_argument("--speed-perturb", type=float, default=0.1, metavar="W")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    if args.pool and not Path(args.pool).is_file():
        ap.error(f"--pool {args.pool}: no such file (python -m train.sentences --fortunes --out {args.pool})")
    start = time.time()
    try:
        if args.everyday_dev:
            if not args.pool:
                ap.error("--everyday-dev needs --pool (its held-out side)")
            meta = everyday_dev(Path(args.out), args.pool, args.everyday_dev, args.pool_eval, args.seed)
        elif args.everyday_eval:
            meta = everyday_eval(Path(args.out), args.pool, args.pool_eval, args.seed)
        else:
            meta = generate(Path(args.out), args.clips, args.engines, args.pool, args.seed, args.template_share,
                            args.noise_share, args.speed_perturb, max(1, args.workers))
    except (ValueError, engines.EngineMissing) as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(meta, indent=1))
    print(f"generated in {time.time() - start:.1f} s -> {args.out}", file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
