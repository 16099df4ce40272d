"""What CTC-guided transcription costs, side by side in one run (embedded default, CPU):

    python -m bench.transcribe [--clips 8] [--threads 2]

Held-out sentences in held-out voices (espeak-ng, made here) are transcribed with the speech-recognition
preset's prompt three ways: greedy, 4 beams, and 4 beams CTC-guided at the preset's weight. Each clip's
audio tokens are cached first, so the figures are decoding only; each answer runs on a fresh thread,
as the app runs it. Reports seconds per transcript, the ratio to plain beam search, and the WER of
this small sample (the evaluation's 180 clips are in assets/eval).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import RESULTS, Table, append_results, environment, in_worker_thread


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from app.presets import PRESETS_BY_KEY
    from model.config import GenerateConfig
    from model.defaults import default_config
    from model.pipeline import Pipeline
    from train import synth
    from train.evaluate import wer

    pipe = Pipeline.from_config(default_config("activation", device="cpu"))
    preset = PRESETS_BY_KEY["asr"]
    scale, beams, ctc = preset.suggested(pipe.trained_scale)
    rng = np.random.default_rng(11)
    voices = synth.voices("eval")
    texts = [synth.sentence_for("eval", rng) for _ in range(args.clips)]
    audio = [synth.pad(synth.speech(t, rng, voice=voices[i % len(voices)])[0], rng) for i, t in enumerate(texts)]
    encoded = [pipe.encode(a) for a in audio]          # decoding only from here on
    ways = {"greedy": GenerateConfig(max_new_tokens=48, num_beams=1, repetition_penalty=1.1),
            f"{beams} beams": GenerateConfig(max_new_tokens=48, num_beams=beams, repetition_penalty=1.1),
            f"{beams} beams + CTC {ctc:g}": GenerateConfig(max_new_tokens=48, num_beams=beams, repetition_penalty=1.1,
                                                       ctc_weight=ctc)}
    in_worker_thread(pipe.answer, encoded[0], preset.prompt)      # warm-up
    table = Table(f"Transcribing {args.clips} held-out clips ({np.mean([len(a) for a in audio]) / 16000:.1f} s "
                  f"on average), LoRA scale {scale:g}", ["decoding", "s per transcript", "vs plain beams", "WER"])
    seconds, errors = {}, {}
    with torch.no_grad():
        for name, gen in ways.items():
            t0 = time.perf_counter()
            hyp = [in_worker_thread(lambda e: pipe.answer(e, preset.prompt, generate=gen, lora_scale=scale).text, e)
                   for e in encoded]
            seconds[name] = (time.perf_counter() - t0) / len(encoded)
            errors[name] = wer(texts, hyp)
    plain = seconds[f"{beams} beams"]
    for name in ways:
        table.add(name, seconds[name], seconds[name] / plain, f"{errors[name]:.1%}")
    table.print()
    append_results("bench.transcribe: CTC-guided transcription", environment(torch.device("cpu"), "float32"), [table],
                   path=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
