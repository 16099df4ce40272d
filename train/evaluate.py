"""Evaluate SALMONN-tiny on the held-out set, for both checkpoints at several LoRA scales:

    python -m train.evaluate            # -> assets/eval/results.{json,md,png}

Metrics (all our own measurements on synthetic, held-out voices and sentences; the scoring rules are
model/metrics.py's, shared with the scale sweep `python -m model.sweep`):
- ASR WER: corpus word error rate on held-out espeak speech (lower case, punctuation removed).
- Attribute accuracy: questions about sound/music properties (count, pitch, instrument, key, tempo...).
  Rule: every word of the short reference answer appears in the normalised answer (numbers may be
  digits or words), and for yes/no references the answer's first word matches. An estimate ("About 97."
  beats per minute) counts when the answer's first number is within 4 % of it, the tolerance of the
  MIREX tempo-estimation metric (Accuracy 1).
- ASR by decoding: at the trained (largest) scale the two WERs are measured again on all held-out ASR
  clips (``--asr-decoding``; the scale sweep asks ``--asr`` of them, a noisier sample), greedy and with
  ``--asr-beams`` beams (default 4, the official SALMONN decoding); every other number uses greedy
  decoding, the app's default for SALMONN-tiny because it streams.
- Everyday-speech WER: the same WER on fixed everyday sentences outside the template grammar
  (``OPEN_EVAL_SENTENCES``, written by us, never in any training set), spoken in held-out voices.
  It measures dictation of words the templates do not have.
- Gender accuracy: "Is the speaker male or female?", same rule.
- Story following rate: the official storytelling prompt; an answer counts as a story when it has at
  least 40 words and 3 sentences and is not a copy of the clip's transcript or caption (fewer than
  60 % of its words come from those references). This is the paper's "following rate" idea.
- Grounded story rate: the share of those stories that name the clip's main sound, by the keyword
  rule per label of ``train.grounding`` (rain, beep, siren, music, piano, speech, knock, dog, ...).
- Held-out engine (``--held-engine``): everyday sentences never trained on, spoken by a TTS engine never
  used in training (flite; ``train.hearing_data --everyday-eval``), WER per engine at the largest scale,
  greedy and with the speech-recognition preset's decoding (beams + CTC guidance).
- Per-task perplexity of the reference answers (teacher forcing), as in the paper's analysis of task
  over-fitting; the "story" references are written by the LLM itself from held-out clips' labels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model import decoding
from model.config import GenerateConfig
from model.defaults import ASSETS, CHECKPOINTS, CTC_WEIGHT, bundled_config
# The scoring rules live with the model's metrics (the scale sweep uses them too); imported from here
# by the training tools as well.
from model.metrics import answer_correct, is_story, wer, words  # noqa: F401
from model.salmonn import SALMONN
from train.grounding import grounded_rate
from train.tasks import PROMPTS, QUESTIONS, describe, full_prompt, question_kind
from train.trainer import load_annotations

STORY_PROMPT = "Based on the audio, write a story in detail. Your story should be highly related to the audio."
# Everyday sentences for the out-of-domain ASR row; ``train.sentences`` refuses to train on any of them.
OPEN_EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please remember to water the plants before you leave for the airport.",
    "The museum opens at nine and closes early on public holidays.",
    "My grandmother grew tomatoes and peppers in her small garden.",
    "We should paint the kitchen a lighter color this summer.",
    "The doctor said I need to drink more water and sleep longer.",
    "Can you explain why the sky looks orange at sunset?",
    "Our team finished the project two days ahead of schedule.",
    "The library will be closed next Monday for repairs.",
    "He forgot his umbrella and walked home in the pouring rain.",
    "I think the soup needs a little more salt and pepper.",
    "She plays the violin in a small orchestra every weekend.",
    "Could you please speak a bit more slowly?",
    "The children built a sandcastle next to the old lighthouse.",
    "Turn left at the bakery and the hotel is on your right.",
    "My brother is afraid of spiders but he loves snakes.",
    "The printer on the second floor is out of paper again.",
    "We watched the fireworks from the roof of our building.",
    "How much does a return ticket to the coast cost?",
    "The farmer sold fresh milk and honey at the village fair.",
    "Nobody noticed that the clock in the hall had stopped.",
    "I left my reading glasses somewhere in the car.",
    "The weather forecast says it will snow tomorrow night.",
    "They are planning a surprise party for their teacher.",
    "This bridge was built more than a hundred years ago.",
    "Would you like to join us for lunch on Friday?",
    "The baby finally fell asleep after a long walk in the park.",
    "A strong wind knocked over the fence behind the school.",
    "Please switch off your phones during the performance.",
    "The new bicycle lane makes my ride to work much safer.",
]
@torch.no_grad()
def generate(model: SALMONN, tokens: list[torch.Tensor], prompts: list[str], scale: float, max_new: int,
             batch: int = 16, beams: int = 1, ctc_weight: float = 0.0) -> list[str]:
    """Answers for many (audio, prompt) rows, in batches, all at one LoRA scale (`decoding.generate`):
    greedy, or beam search with `beams` beams on the left-padded batch; CTC-guided with `ctc_weight`."""
    gen = GenerateConfig(max_new_tokens=max_new, num_beams=beams, repetition_penalty=model.cfg.generate.repetition_penalty,
                         ctc_weight=ctc_weight)
    out = []
    for i in range(0, len(prompts), batch):
        texts = [model.prompt.conversation([p]) for p in prompts[i:i + batch]]
        embeds, mask, _ = model.assemble(tokens[i:i + batch], texts)
        *_, last = decoding.generate(model, embeds, mask, gen, scale, guide=model.ctc_guide(tokens[i:i + batch], gen))
        out += [model.decode_text(t) for t in last.tokens]
    return out


@torch.no_grad()
def perplexity(model: SALMONN, tokens, prompts, refs, scale: float, batch: int = 16) -> float:
    tok = model.tokenizer
    nll, count = 0.0, 0
    for i in range(0, len(prompts), batch):
        texts = [model.prompt.conversation([p]) for p in prompts[i:i + batch]]
        targets = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in refs[i:i + batch]]
        for lp in model.target_logprobs(tokens[i:i + batch], texts, targets, scale):
            nll -= float(lp.sum())
            count += len(lp)
    return float(np.exp(nll / count)) if count else float("nan")


def select(rows: list[dict], task: str, n: int) -> list[dict]:
    picked = [r for r in rows if r["task"] == task]
    return picked[:: max(1, len(picked) // n)][:n] if n > 0 else []     # 0: that part is skipped


def open_eval_clips(n: int) -> list[tuple[str, np.ndarray]]:
    """``OPEN_EVAL_SENTENCES[:n]`` with its audio, each in one of the held-out voices (deterministic)."""
    from train import synth

    held_out = synth.voices("eval")
    rng = np.random.default_rng(0)
    return [(text, synth.speech(text, rng, voice=held_out[i % len(held_out)])[0])
            for i, text in enumerate(OPEN_EVAL_SENTENCES[:n])]


def evaluate_checkpoint(variant: str, ckpt: str | Path, rows: list[dict], stories: list[dict], scales: list[float],
                        sizes: dict, everyday: list[tuple[str, np.ndarray]] = (), log=print, asr_beams: int = 1,
                        asr_ctc: float = 0.0, held_engine: list[dict] = ()) -> dict:
    """`ckpt`'s weights, reported as `variant`. `everyday`: (sentence, audio) pairs (``open_eval_clips``);
    `held_engine`: the held-out engine's everyday ASR rows (``held_engine_wer``). At the largest scale the WERs
    are measured again on ``sizes["asr_decoding"]`` clips: greedy, `asr_beams` beams, CTC-guided (`asr_ctc`)."""
    model = SALMONN.from_config(bundled_config(ckpt))
    cache: dict[str, torch.Tensor] = {}

    def tokens_for(sel):
        for r in sel:
            if r["path"] not in cache:
                from model.audio import prepare_audio
                cache[r["path"]] = model.encode_audio(prepare_audio(r["path"]).wav, output_attentions=False).embeds
        return [cache[r["path"]] for r in sel]

    asr = select(rows, "asr", sizes["asr"])
    asr_decoding = select(rows, "asr", sizes.get("asr_decoding", sizes["asr"]))
    open_refs = [text for text, _ in everyday]
    open_tokens = [model.encode_audio(wav, output_attentions=False).embeds for _, wav in everyday]
    qa = select(rows, "QA", sizes["qa"])
    gender = select(rows, "gender_recognition", sizes["gender"])
    story_rows = stories[: sizes["story"]]
    ppl_tasks = {t: select(rows, t, sizes["ppl"]) for t in ("asr", "audiocaption", "music_description", "QA", "speech_audio")}
    ppl_tasks["story"] = stories[: sizes["ppl"]]
    asr_prompt = full_prompt(PROMPTS["asr"][0])
    labels_of = {r["path"]: r.get("labels", {}) for r in rows}

    def transcribe(scale: float, beams: int = 1, clips: list[dict] = asr, everyday: bool = True, ctc: float = 0.0) -> dict:
        """Held-out (`clips`) and, with `everyday`, everyday WER at one scale, with three examples of each."""
        hyp = generate(model, tokens_for(clips), [r["prompt"] for r in clips], scale, 48, beams=beams, ctc_weight=ctc)
        out = {"asr_wer": wer([r["text"] for r in clips], hyp) if clips else float("nan"),
               "asr_examples": [{"ref": r["text"], "hyp": h} for r, h in list(zip(clips, hyp))[:3]]}
        if open_refs and everyday:
            hyp = generate(model, open_tokens, [asr_prompt] * len(open_refs), scale, 48, beams=beams, ctc_weight=ctc)
            out["open_asr_wer"] = wer(open_refs, hyp)
            out["open_asr_examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(open_refs, hyp))[:3]]
        return out

    result = {}
    for scale in scales:
        t0 = time.perf_counter()
        entry: dict = transcribe(scale)
        if scale == max(scales):
            t1 = time.perf_counter()
            # greedy everyday WER was just measured at this scale; only the held-out sample differs
            greedy = dict(entry) if asr_decoding == asr else {
                **transcribe(scale, 1, asr_decoding, everyday=False),
                **{k: v for k, v in entry.items() if k.startswith("open_asr")}}
            entry["decoding"] = {"clips": len(asr_decoding), "greedy": greedy}
            if asr_beams > 1:
                entry["decoding"]["beams"] = {"beams": asr_beams, **transcribe(scale, asr_beams, asr_decoding)}
            if asr_ctc and model.ctc_head is not None:
                entry["decoding"]["ctc"] = {"weight": asr_ctc, "greedy": transcribe(scale, 1, asr_decoding, ctc=asr_ctc)}
                if asr_beams > 1:
                    entry["decoding"]["ctc"]["beams"] = {"beams": asr_beams,
                                                         **transcribe(scale, asr_beams, asr_decoding, ctc=asr_ctc)}
            if held_engine:
                entry["decoding"]["held_engine"] = held_engine_wer(model, held_engine, scale, asr_beams, asr_ctc)
            entry["decoding"]["seconds"] = round(time.perf_counter() - t1, 1)
        entry["attribute_accuracy"], entry["attribute_by_kind"], _ = attribute_scores(model, tokens_for(qa), qa, scale)
        hyp = generate(model, tokens_for(gender), [r["prompt"] for r in gender], scale, 8)
        entry["gender_accuracy"] = mean([answer_correct(r["text"], h) for r, h in zip(gender, hyp)])
        hyp = generate(model, tokens_for(story_rows), [STORY_PROMPT] * len(story_rows), scale, 120)
        entry["story_following_rate"] = mean([is_story(h, s["references"]) for s, h in zip(story_rows, hyp)])
        entry["grounded_story_rate"] = grounded_rate(hyp, [labels_of.get(s["path"], {}) for s in story_rows])
        entry["story_examples"] = hyp[:2]
        entry["perplexity"] = {t: perplexity(model, tokens_for(sel), [r["prompt"] if t != "story" else STORY_PROMPT for r in sel],
                                             [r["text"] for r in sel], scale) for t, sel in ppl_tasks.items()}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"[{variant} @ {scale:g}] WER {entry['asr_wer']:.3f} everyday {entry.get('open_asr_wer', float('nan')):.3f} attr {entry['attribute_accuracy']:.3f} "
            f"gender {entry['gender_accuracy']:.3f} story {entry['story_following_rate']:.2f} ({entry['seconds']} s)"
            + (f"; {entry['decoding']['clips']} clips: greedy WER {entry['decoding']['greedy']['asr_wer']:.3f}"
               if "decoding" in entry else "")
            + (f", {asr_beams} beams {entry['decoding']['beams']['asr_wer']:.3f}" if "beams" in entry.get("decoding", {}) else "")
            + "".join(f", {k} + CTC {asr_ctc:g} {v['asr_wer']:.3f}" for k, v in entry.get("decoding", {}).get("ctc", {}).items()
                      if isinstance(v, dict)))
        result[f"{scale:g}"] = entry
    return result


def held_engine_wer(model: SALMONN, rows: list[dict], scale: float, beams: int, ctc: float) -> dict:
    """Everyday WER on speech of an engine never used in training (``train.hearing_data --everyday-eval``),
    per engine, greedy and with the speech-recognition preset's decoding (`beams` beams + CTC `ctc`)."""
    from model.audio import prepare_audio

    tokens = [model.encode_audio(prepare_audio(r["path"]).wav, output_attentions=False).embeds for r in rows]
    refs, prompts = [r["text"] for r in rows], [r["prompt"] for r in rows]
    out = {}
    for engine in sorted({r["labels"]["speech"]["engine"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["labels"]["speech"]["engine"] == engine]
        sel_t, sel_p, sel_r = [tokens[i] for i in idx], [prompts[i] for i in idx], [refs[i] for i in idx]
        out[engine] = {"clips": len(idx), "greedy": wer(sel_r, generate(model, sel_t, sel_p, scale, 48))}
        if model.ctc_head is not None and ctc:
            out[engine]["preset"] = wer(sel_r, generate(model, sel_t, sel_p, scale, 48, beams=beams, ctc_weight=ctc))
    return out


def attribute_scores(model: SALMONN, tokens: list[torch.Tensor], rows: list[dict], scale: float) -> tuple[float, dict, list[str]]:
    """(share right, ``attribute_by_kind``, answers) for short questions `rows` asked about `tokens`."""
    answers = generate(model, tokens, [r["prompt"] for r in rows], scale, 16)
    correct = [answer_correct(r["text"], a) for r, a in zip(rows, answers)]
    return mean(correct), attribute_by_kind(rows, correct), answers


def attribute_by_kind(rows: list[dict], correct: list[bool]) -> dict:
    """{question kind: {"correct", "asked"}} in ``tasks.QUESTIONS`` order: which attributes the model
    hears (instrument, drums) and which it does not (key, counts)."""
    by: dict[str, list[bool]] = {}
    for r, ok in zip(rows, correct):
        by.setdefault(question_kind(r.get("Q", "")), []).append(bool(ok))
    order = list(QUESTIONS) + ["other"]
    return {k: {"correct": sum(by[k]), "asked": len(by[k])} for k in sorted(by, key=order.index)}


def story_references(data: Path, rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Held-out storytelling references: eval clips with a story the base LLM wrote from their labels."""
    cache = data / "eval_stories.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from train.stories import write_activation_data

    clips = {}
    for r in rows:
        clips.setdefault(r["path"], r)
    chosen = [r for r in clips.values() if r["labels"]["type"] != "speech"][:: 4][:n]
    clip_dicts = [{"path": r["path"], "split": "train", "type": r["labels"]["type"], "id": r["id"],
                   "description": describe(r["labels"])} for r in chosen]
    model = SALMONN.from_config(bundled_config())   # base LLM only
    written = write_activation_data(model, clip_dicts, len(clip_dicts), 0, seed)
    refs = {}
    for r in rows:
        if r["task"] in ("asr", "audiocaption", "music_description", "speech_audio"):
            refs.setdefault(r["path"], []).append(r["text"])
    out = [{"path": w["path"], "text": w["text"], "references": refs.get(w["path"], [])} for w in written]
    cache.write_text(json.dumps(out, indent=1))
    return out


def mean(hits: list[bool]) -> float:
    """The rate of a measure; nan when it was skipped (no examples), which the table shows as "–"."""
    return float(np.mean(hits)) if hits else float("nan")


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or np.isnan(x) else f"{x * 100:.{digits}f} %"


def num(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.2f}"


def write_report(results: dict, out: Path, scales: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| checkpoint | LoRA scale | ASR WER ↓ | everyday WER ↓ | attribute acc ↑ | gender acc ↑ | story rate ↑ | grounded stories ↑ | PPL asr | PPL caption | PPL music | PPL story |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, per_scale in results["checkpoints"].items():
        for s, e in per_scale.items():
            p = e["perplexity"]
            lines.append(f"| {variant} | {s} | {pct(e['asr_wer'])} | {pct(e.get('open_asr_wer'))} | "
                         f"{pct(e['attribute_accuracy'])} | {pct(e['gender_accuracy'])} | {pct(e['story_following_rate'], 0)} | "
                         f"{pct(e.get('grounded_story_rate'), 0)} | "
                         + " | ".join(num(p[t]) for t in ("asr", "audiocaption", "music_description", "story")) + " |")
    top = f"{max(scales):g}"
    names = [n for n, per in results["checkpoints"].items() if "attribute_by_kind" in per.get(top, {})]
    if names:
        kinds = list(dict.fromkeys(k for n in names for k in results["checkpoints"][n][top]["attribute_by_kind"]))
        lines += ["", f"Attribute questions by kind, LoRA scale {top} (correct / asked):", "",
                  "| question kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in kinds:
            cells = [results["checkpoints"][n][top]["attribute_by_kind"].get(k) for n in names]
            lines.append(f"| {k} | " + " | ".join(f"{c['correct']}/{c['asked']}" if c else "–" for c in cells) + " |")
    decoded = [(n, per[top]["decoding"]) for n, per in results["checkpoints"].items() if "decoding" in per.get(top, {})]
    if decoded:
        clips = sorted({d["clips"] for _, d in decoded})
        lines += ["", f"ASR at LoRA scale {top} on {' / '.join(map(str, clips))} held-out ASR clips, by decoding "
                  "(greedy; beam search as the official SALMONN decodes; CTC-guided with the checkpoint's CTC head, "
                  "as the app's transcription preset):", "",
                  "| checkpoint | decoding | ASR WER ↓ | everyday WER ↓ |", "|---|---|---|---|"]
        for n, d in decoded:
            rows = [("greedy", d["greedy"])] + ([(f"{d['beams']['beams']} beams", d["beams"])] if "beams" in d else [])
            ctc = d.get("ctc", {})
            rows += [(f"greedy + CTC {ctc['weight']:g}", ctc["greedy"])] if ctc else []
            rows += [(f"{ctc['beams']['beams']} beams + CTC {ctc['weight']:g}", ctc["beams"])] if "beams" in ctc else []
            for label, e in rows:
                lines.append(f"| {n} | {label} | {pct(e['asr_wer'])} | {pct(e.get('open_asr_wer'))} |")
    lines += held_engine_lines(results, top)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("asr_wer", "ASR WER"), ("attribute_accuracy", "attribute accuracy"),
              ("story_following_rate", "story following rate"), (None, "perplexity of story references")]
    for ax, (key, title) in zip(axes, panels):
        for variant, per_scale in results["checkpoints"].items():
            xs = [float(s) for s in per_scale]
            ys = [e[key] if key else e["perplexity"]["story"] for e in per_scale.values()]
            ax.plot(xs, ys, marker="o", label=variant)
        ax.set_title(title)
        ax.set_xlabel("LoRA scale")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=80)


def held_engine_lines(results: dict, top: str) -> list[str]:
    """The report's table of everyday WER per held-out engine (none measured: no lines)."""
    cells = [(n, engine, e) for n, per in results["checkpoints"].items()
             for engine, e in per.get(top, {}).get("decoding", {}).get("held_engine", {}).items()]
    if not cells:
        return []
    lines = ["", f"Everyday sentences never trained on, spoken by a TTS engine never used in training, LoRA scale {top}:",
             "", "| checkpoint | engine | clips | greedy WER ↓ | preset WER ↓ |", "|---|---|---|---|---|"]
    for n, engine, e in cells:
        preset = f"{e['preset'] * 100:.1f} %" if "preset" in e else "–"
        lines.append(f"| {n} | {engine} | {e['clips']} | {e['greedy'] * 100:.1f} % | {preset} |")
    return lines


def held_engine_only(chosen: dict, folder: Path, beams: int, ctc: float) -> int:
    """Print (and write to `folder`/wer.json) each checkpoint's everyday WER per held-out engine."""
    if not (folder / "eval.json").is_file():
        raise SystemExit(f"--held-engine {folder}: no eval.json (python -m train.hearing_data --everyday-eval --out {folder})")
    rows = load_annotations(folder / "eval.json")
    results = {}
    for name, path in chosen.items():
        model = SALMONN.from_config(bundled_config(path))
        results[name] = held_engine_wer(model, rows, model.cfg.trained_lora_scale, beams, ctc)
        print(f"{name} ({path}): {json.dumps(results[name])}", flush=True)
    (folder / "wer.json").write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default=str(ASSETS / "eval"))
    ap.add_argument("--scales", default="0,1,2,3,4")
    ap.add_argument("--asr", type=int, default=40, help="held-out ASR clips at every scale")
    ap.add_argument("--asr-decoding", type=int, default=1000,
                    help="held-out ASR clips for the greedy / beam-search table at the largest scale (default: all)")
    ap.add_argument("--open", type=int, default=len(OPEN_EVAL_SENTENCES),
                    help="everyday sentences outside the template grammar for the out-of-domain WER (0 = skip)")
    ap.add_argument("--qa", type=int, default=1000, help="attribute questions (default: all held-out ones)")
    ap.add_argument("--asr-beams", type=int, default=4,
                    help="beams for that table (1 = greedy only)")
    ap.add_argument("--asr-ctc", type=float, default=CTC_WEIGHT,
                    help="CTC weight for that table's CTC-guided rows (checkpoints with a CTC head; 0 = skip)")
    ap.add_argument("--gender", type=int, default=20)
    ap.add_argument("--story", type=int, default=12)
    ap.add_argument("--ppl", type=int, default=12)
    ap.add_argument("--held-engine", default="",
                    help="folder from python -m train.hearing_data --everyday-eval: everyday WER per held-out engine")
    ap.add_argument("--held-engine-only", action="store_true",
                    help="with --held-engine: only that table, at the checkpoints' trained scale (no data folder needed)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help="evaluate these trained weights instead of the shipped two (repeatable), e.g. to compare runs")
    args = ap.parse_args(argv)
    chosen = {}
    for item in args.ckpt:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--ckpt {item!r}: expected NAME=PATH of an existing checkpoint")
        chosen[name] = path
    torch.manual_seed(0)
    if args.held_engine_only:
        return held_engine_only(chosen or {v: CHECKPOINTS[v] for v in ("instruction", "activation")},
                                Path(args.held_engine), args.asr_beams, args.asr_ctc)
    data = Path(args.data)
    rows = load_annotations(data / "eval.json")
    scales = [float(s) for s in args.scales.split(",")]
    sizes = {"asr": args.asr, "asr_decoding": args.asr_decoding, "open": args.open, "qa": args.qa, "gender": args.gender, "story": args.story, "ppl": args.ppl}
    stories = story_references(data, rows, max(args.story, args.ppl))
    results = {"sizes": sizes, "checkpoints": {}}
    chosen = chosen or {v: CHECKPOINTS[v] for v in ("instruction", "activation") if CHECKPOINTS[v].is_file()}
    everyday = open_eval_clips(args.open)    # synthesized once for all checkpoints
    held_engine = load_annotations(Path(args.held_engine) / "eval.json") if args.held_engine else []
    for name, path in chosen.items():
        results["checkpoints"][name] = evaluate_checkpoint(name, path, rows, stories, scales, sizes, everyday,
                                                                asr_beams=args.asr_beams, asr_ctc=args.asr_ctc,
                                                                held_engine=held_engine)
    write_report(results, Path(args.out), scales)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
