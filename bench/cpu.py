"""CPU benchmark of the embedded default (SALMONN-tiny), 2 threads by default.

    python -m bench.cpu                      # full run, appends to bench/RESULTS.md
    python -m bench.cpu --tiny-test /tmp/t   # smoke run on the tests' tiny random model (CI)

Scenarios, each measured in this one run: app cold start to ready; per-stage times for a clip; re-asking
about the same audio (no cache / audio tokens cached / + prompt-prefix KV cache); a 5-scale sweep vs one
answer; and the before/after figures of each optimisation (fp32 vs bf16, eager vs SDPA attention,
transformers' generate vs our decode loop). Without the trained weights (assets/) the model is
SALMONN-tiny with untrained connection modules: the same compute, so the same speed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from .common import REPO, RESULTS, Table, in_worker_thread, append_results, check, environment, timed
from .measure import (bytes_per_token, copy_bandwidth, decode_run, fixed_length, hf_generate_run, median_answer,
                      set_attention, stage_times, sweep_times, test_audio)

PROMPT = "Describe the audio in detail."
FOLLOW_UP = "What is the speaker's tone?"


def build_config(args, dtype: str = "float32", **changes):
    if args.tiny_test:
        from model.random_tiny import tiny_config

        return tiny_config(Path(args.tiny_test), dtype=dtype, **changes), "tests' tiny random model"
    from model.defaults import bundled_config, default_config

    try:
        return (default_config("activation", device="cpu", dtype=dtype, **changes),
                "SALMONN-tiny (trained activation weights)")
    except Exception:  # noqa: BLE001 - weights still training: identical compute without them
        return (bundled_config(device="cpu", dtype=dtype, **changes),
                "SALMONN-tiny without trained connection weights (same compute)")


def cold_start(args, separate: bool = False) -> dict:
    cmd = [sys.executable, "-m", "bench.coldstart", "--threads", str(args.threads)] + (["--separate"] if separate else [])
    if args.tiny_test:
        cmd += ["--tiny-test", args.tiny_test]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    line = next((l for l in proc.stdout.splitlines() if l.startswith("COLDSTART ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-400:], "wall_s": wall}
    out = json.loads(line[len("COLDSTART "):])
    out["wall_s"] = wall
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="answer length for every timed answer")
    p.add_argument("--clip", type=float, default=10.0, help="clip seconds for the per-stage and TTFT figures")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny-test", metavar="DIR", help="use the tests' tiny random model (smoke run)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-cold-start", action="store_true")
    p.add_argument("--cold-start-only", action="store_true", help="only the app cold start (both ways)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-int8", action="store_true", help="skip the --8bit (CPU int8 weights) comparison")
    p.add_argument("--note", action="append", default=[], help="a note to record with the results")
    return p.parse_args(argv)


@dataclass
class Bench:
    """The model under test and the inputs every timed section shares."""
    args: argparse.Namespace
    model: Any
    pipe: Any            # with the prompt-prefix KV cache
    base_pipe: Any       # the same model without it
    gen: Any             # fixed answer length, so every timed answer generates the same token count
    scale: float
    text: str            # PROMPT in the model's conversation template
    wav: np.ndarray
    path: Path           # the same clip as a file

    @property
    def reps(self) -> int:
        return self.args.repeats


def stereo_file(wav: np.ndarray) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    # a 44.1 kHz stereo file, so loading includes resampling and channel mixing
    import scipy.signal

    stereo = scipy.signal.resample_poly(wav, 441, 160).astype(np.float32)
    path = tmp / "clip.wav"
    sf.write(path, np.stack([stereo, stereo * 0.5], axis=1), 44100)
    return path


def mean_context(b: Bench, st: dict) -> int:
    return st["prompt_tokens"] + b.args.tokens // 2     # mean KV length while decoding


def cold_start_section(args, notes: list[str]) -> tuple[Table, dict]:
    """App cold start in a fresh process, both ways; returns the table and the after ("shared") figures."""
    cold = cold_start(args)
    before = cold_start(args, separate=True)      # each checkpoint as its own full model
    t = Table("App cold start to ready (fresh process, what launch_app.py does up to serving)",
              ["stage", "each checkpoint its own model (before)", "checkpoints share one model (after)"])
    for key in ("import_s", "load_s", "build_app_s", "server_s", "ready_s", "wall_s", "peak_rss_mb"):
        if key in cold:
            name = key.rsplit("_", 1)[0].replace("_", " ") + (" (incl. interpreter start)" if key == "wall_s" else "")
            t.add(name + (" MB" if key == "peak_rss_mb" else " s"), round(before.get(key, float("nan")), 2),
                  round(cold[key], 2))
    t.print()
    notes.append(f"cold start config: {cold.get('config', '?')}: {cold.get('checkpoints', '?')} checkpoint(s) "
                 f"on {cold.get('models', '?')} loaded model(s) (before: {before.get('models', '?')})")
    if "app_error" in cold or "error" in cold:
        notes.append(f"cold start problem: {cold.get('app_error') or cold.get('error')}")
    return t, cold


def stages_section(b: Bench) -> tuple[Table, dict, dict]:
    """Per-stage times of one clip; returns the table, the stage times and the end-to-end answer."""
    from model.audio import prepare_audio

    args, reps = b.args, b.reps
    load_s, _ = timed(lambda: prepare_audio(b.path), reps)
    st = stage_times(b.model, b.wav, b.text, b.gen, b.scale, reps)
    ttft = median_answer(b.base_pipe, str(b.path), PROMPT, b.gen, reps, clear="all")
    t = Table(f"Per-stage times, {args.clip:g} s clip, {st['audio_tokens']} audio tokens, "
              f"{st['prompt_tokens']}-position prompt, fp32", ["stage", "ms", "target"])
    t.add("load + resample (44.1 kHz stereo file)", load_s * 1000, "")
    t.add("features (log-mel)", st["features_s"] * 1000, "")
    t.add("Whisper encoder", st["whisper_s"] * 1000, "")
    t.add("BEATs encoder", None if st["beats_s"] is None else st["beats_s"] * 1000, "")
    t.add("Q-Former + projection", st["qformer_s"] * 1000, "")
    t.add("LLM prefill", st["prefill_s"] * 1000, "")
    t.add("time to first token, end to end (file -> first token)", ttft["first_token_s"] * 1000,
          f"<= 1000: {check(ttft['first_token_s'], 1.0, 'lower')}")
    t.add("decode ms/token", st["decode_ms_per_token"], "")
    t.add("decode tokens/s", st["tokens_per_s"], f">= 25: {check(st['tokens_per_s'], 25, 'higher')}")
    t.add("decode tokens/s through Pipeline.stream", ttft["tokens_per_s"], "")
    t.print()
    return t, st, ttft


def reask_section(b: Bench, notes: list[str]) -> tuple[Table, dict[str, dict]]:
    """Re-asking about the same audio; returns the table and each case's answer by key."""
    pipe, base_pipe, wav, gen, reps = b.pipe, b.base_pipe, b.wav, b.gen, b.reps
    r: dict[str, dict] = {}
    r["none"] = median_answer(base_pipe, wav, PROMPT, gen, reps, clear="all")
    r["audio_only"] = median_answer(base_pipe, wav, PROMPT, gen, reps, clear="none")
    pipe.clear_caches()
    pipe.answer(wav, PROMPT, generate=gen)
    r["same"] = median_answer(pipe, wav, PROMPT, gen, reps)
    r["other"] = median_answer(pipe, wav, "What do you hear?", gen, 1)     # 1: a second run would be a re-ask
    first = pipe.answer(wav, PROMPT, generate=gen)
    r["follow_plain"] = median_answer(base_pipe, wav, FOLLOW_UP, gen, reps, history=[(PROMPT, first.text)])
    r["follow"] = median_answer(pipe, wav, FOLLOW_UP, gen, 1, history=[(PROMPT, first.text)])
    t = Table("Re-asking about the same audio: time to first token", ["case", "encoders run", "positions prefilled",
                                                                         "first token ms", "total ms"])
    for name, key in [("new audio (no cache)", "none"), ("same question, audio tokens cached", "audio_only"),
                      ("same question, + prompt-prefix KV cache", "same"),
                      ("new question, + prompt-prefix KV cache", "other"),
                      ("follow-up turn, audio tokens cached", "follow_plain"),
                      ("follow-up turn, + prompt-prefix KV cache", "follow")]:
        a = r[key]
        t.add(name, not a["audio_cached"], int(a["prompt_tokens"] - a.get("reused_tokens", 0)),
              a["first_token_s"] * 1000, a["total_s"] * 1000)
    t.print()
    same_text = r["same"]["text"] == r["audio_only"]["text"] and r["follow"]["text"] == r["follow_plain"]["text"]
    notes.append(f"cached-prefix answers identical to uncached ones in this run: {same_text}")
    return t, r


def sweep_section(b: Bench, notes: list[str]) -> tuple[Table, list[float], dict]:
    """The 5-scale LoRA sweep vs one answer; returns the table, the scales and the sweep times."""
    scale = b.scale
    scales = [0.0, scale / 4, scale / 2, 3 * scale / 4, scale]
    sw = sweep_times(b.pipe, b.wav, PROMPT, b.gen, scales, b.reps)
    t = Table(f"LoRA scale sweep, {len(scales)} scales x {b.args.tokens} tokens (audio tokens cached)",
              ["path", "seconds", "x one answer", "target"])
    t.add("one answer", sw["one_s"], 1.0, "")
    t.add("5 answers one by one (before)", sw["sequential_s"], sw["sequential_s"] / sw["one_s"], "")
    t.add("5 scales in one batched pass (after)", sw["batched_s"], sw["batched_s"] / sw["one_s"],
          f"<= 1.5: {check(sw['batched_s'] / sw['one_s'], 1.5, 'lower')}")
    t.add("batched rerun, prompt prefixes cached", sw["rerun_s"], sw["rerun_s"] / sw["one_s"], "")
    t.print()
    notes.append(f"batched sweep answers identical to one-by-one answers in this run: {sw['same_texts']}")
    return t, scales, sw


def low_precision_variants(args) -> list[tuple[str, dict]]:
    return ([] if args.no_bf16 else [("bf16", {"dtype": "bfloat16"})]) + \
        ([] if args.no_int8 else [("int8 weights (--8bit)", {"load_in_8bit": True})])


def measure_low_precision(b: Bench, changes: dict, scales: list[float], context: int) -> dict:
    """A lower-precision variant of the same model, measured in this run as the fp32 one was.
    The variant is freed on return, before the next one is built."""
    from model.pipeline import Pipeline
    from model.salmonn import SALMONN

    reps = b.reps
    cfg_low, _ = build_config(b.args, **changes)
    m_low = SALMONN.from_config(cfg_low)
    if b.args.tiny_test:
        from tests.conftest import randomize_lora

        randomize_lora(m_low)
    p_low = Pipeline(m_low, prefix_cache=False)
    st_low = stage_times(m_low, b.wav, b.text, b.gen, b.scale, reps)
    ttft_low = median_answer(p_low, str(b.path), PROMPT, b.gen, reps, clear="all")
    sw_low = sweep_times(p_low, b.wav, PROMPT, b.gen, scales, reps, full=False)
    return {"stages": st_low, "ttft": ttft_low, "sweep": sw_low, "bytes_per_token": bytes_per_token(m_low, context)}


def add_low_precision_rows(t: Table, label: str, changes: dict, st: dict, ttft: dict, sw: dict, v: dict) -> None:
    st_low, ttft_low, sw_low = v["stages"], v["ttft"], v["sweep"]
    if "dtype" in changes:
        t.add(f"fp32 -> {label}: Whisper encoder ms", st["whisper_s"] * 1000, st_low["whisper_s"] * 1000,
              f"{st['whisper_s'] / st_low['whisper_s']:.2f}x")
    t.add(f"fp32 -> {label}: LLM prefill ms", st["prefill_s"] * 1000, st_low["prefill_s"] * 1000,
          f"{st['prefill_s'] / st_low['prefill_s']:.2f}x")
    t.add(f"fp32 -> {label}: decode tokens/s", st["tokens_per_s"], st_low["tokens_per_s"],
          f"{st_low['tokens_per_s'] / st['tokens_per_s']:.2f}x")
    t.add(f"fp32 -> {label}: first token ms, end to end", ttft["first_token_s"] * 1000,
          ttft_low["first_token_s"] * 1000, f"{ttft['first_token_s'] / ttft_low['first_token_s']:.2f}x")
    t.add(f"fp32 -> {label}: 5-scale sweep / one answer", sw["batched_s"] / sw["one_s"],
          sw_low["batched_s"] / sw_low["one_s"], "")
    t.add(f"fp32 -> {label}: one answer seconds", sw["one_s"], sw_low["one_s"],
          f"{sw['one_s'] / sw_low['one_s']:.2f}x")
    t.add(f"fp32 -> {label}: 5-scale sweep seconds", sw["batched_s"], sw_low["batched_s"],
          f"{sw['batched_s'] / sw_low['batched_s']:.2f}x")


def before_after_section(b: Bench, st: dict, ttft: dict, r: dict[str, dict], scales: list[float], sw: dict,
                         notes: list[str]) -> tuple[Table, dict[str, dict]]:
    """Each optimisation's before/after figures; returns the table and the lower-precision variants'
    figures by label."""
    model, gen, scale, reps = b.model, b.gen, b.scale, b.reps
    embeds, _, _ = model.assemble([model.encode_audio(b.wav, output_attentions=False).embeds], [b.text])
    t = Table("Decoding before/after (same prompt, same token count)", ["change", "before", "after", "ratio"])
    ours = decode_run(model, embeds, gen, scale, reps)
    stock = hf_generate_run(model, embeds, gen, scale, reps)
    t.add("transformers generate() -> our decode loop: answer seconds", stock, ours["total_s"],
          f"{stock / ours['total_s']:.2f}x")
    set_attention(model, "eager")
    eager = decode_run(model, embeds, gen, scale, reps)
    set_attention(model, "sdpa")
    t.add("eager -> SDPA attention: prefill ms", eager["prefill_s"] * 1000, ours["prefill_s"] * 1000,
          f"{eager['prefill_s'] / ours['prefill_s']:.2f}x")
    t.add("eager -> SDPA attention: decode tokens/s", eager["tokens_per_s"], ours["tokens_per_s"],
          f"{ours['tokens_per_s'] / eager['tokens_per_s']:.2f}x")
    low: dict[str, dict] = {}        # lower-precision variants of the same model, measured in this run
    for label, changes in low_precision_variants(b.args):
        low[label] = measure_low_precision(b, changes, scales, mean_context(b, st))
        add_low_precision_rows(t, label, changes, st, ttft, sw, low[label])
        notes.append(f"{label} answer equals fp32 answer (greedy, {b.args.tokens} tokens): "
                     f"{low[label]['ttft']['text'] == ttft['text']}")
    none, audio_only, same = r["none"], r["audio_only"], r["same"]
    follow_plain, follow = r["follow_plain"], r["follow"]
    t.add("audio-token cache: re-ask first token ms", none["first_token_s"] * 1000,
          audio_only["first_token_s"] * 1000, f"{none['first_token_s'] / audio_only['first_token_s']:.2f}x")
    t.add("prompt-prefix KV cache: re-ask first token ms", audio_only["first_token_s"] * 1000,
          same["first_token_s"] * 1000, f"{audio_only['first_token_s'] / same['first_token_s']:.2f}x")
    t.add("prompt-prefix KV cache: follow-up first token ms", follow_plain["first_token_s"] * 1000,
          follow["first_token_s"] * 1000, f"{follow_plain['first_token_s'] / follow['first_token_s']:.2f}x")
    t.add("batched sweep: 5 scales seconds", sw["sequential_s"], sw["batched_s"],
          f"{sw['sequential_s'] / sw['batched_s']:.2f}x")
    t.print()
    return t, low


def bandwidth_section(b: Bench, st: dict, low: dict[str, dict]) -> Table:
    """Decode speed of each dtype vs the memory-bandwidth limit."""
    args = b.args
    bandwidth = copy_bandwidth(torch.device("cpu"), 0.5)
    t = Table(f"Decode vs the memory-bandwidth limit ({args.threads} threads, copy bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s = 2 x bytes / time)",
              ["dtype", "bytes read per token (MB)", "limit tokens/s", "measured tokens/s", "% of limit"])
    rates = [("float32", st["tokens_per_s"], bytes_per_token(b.model, mean_context(b, st)))] + \
        [(k, v["stages"]["tokens_per_s"], v["bytes_per_token"]) for k, v in low.items()]
    for name, rate, nbytes in rates:     # each model's own weights as loaded (int8: LoRA and norms stay float)
        limit = bandwidth / nbytes
        t.add(name, nbytes / 1e6, limit, rate, 100 * rate / limit)
    t.print()
    return t


def targets_section(args, cold: dict | None, st: dict, ttft: dict, same: dict, sw: dict,
                    low: dict[str, dict]) -> Table:
    t = Table("CPU targets", ["target", "measured", "status"])
    if cold and "ready_s" in cold:
        t.add("app ready <= 20 s", f"{cold['ready_s']:.1f} s", check(cold["ready_s"], 20, "lower"))
    t.add(f"first token for a {args.clip:g} s clip <= 1 s", f"{ttft['first_token_s']:.3f} s",
          check(ttft["first_token_s"], 1.0, "lower"))
    t.add(">= 25 tokens/s", f"{st['tokens_per_s']:.1f}", check(st["tokens_per_s"], 25, "higher"))
    for label, v in low.items():
        rate = v["stages"]["tokens_per_s"]
        t.add(f">= 25 tokens/s with {label}", f"{rate:.1f}", check(rate, 25, "higher"))
    t.add("re-ask skips the encoders", f"encoders run: {not same['audio_cached']}",
          "met" if same["audio_cached"] else "MISSED")
    ratio = sw["batched_s"] / sw["one_s"]
    t.add("5-scale sweep <= 1.5x one answer", f"{ratio:.2f}x", check(ratio, 1.5, "lower"))
    for label, v in low.items():
        r = v["sweep"]["batched_s"] / v["sweep"]["one_s"]
        t.add(f"5-scale sweep <= 1.5x one answer with {label}", f"{r:.2f}x", check(r, 1.5, "lower"))
    t.print()
    return t


def write_results(args, title: str, dtype_note: str, tables: list[Table], notes: list[str]) -> None:
    env = environment(torch.device("cpu"), dtype_note)
    out = append_results(title + (" (smoke: tiny test model)" if args.tiny_test else ""),
                         env, tables, notes, args.results)
    print(f"appended to {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from model.pipeline import Pipeline
    from model.salmonn import SALMONN

    tables: list[Table] = []
    notes = list(args.note)
    cold = None
    if not args.no_cold_start:
        t, cold = cold_start_section(args, notes)
        tables.append(t)
    if args.cold_start_only:
        write_results(args, "CPU, embedded default: cold start only", "float32", tables, notes)
        return 0
    cfg, what = build_config(args)
    notes.append(f"model: {what}")
    model = SALMONN.from_config(cfg)
    if args.tiny_test:
        from tests.conftest import randomize_lora

        randomize_lora(model)
    pipe = Pipeline(model)
    base_pipe = Pipeline(model, prefix_cache=False)
    gen = fixed_length(pipe.default_generate, args.tokens)
    scale = pipe.trained_scale
    text = pipe.prompt_text(PROMPT)
    wav = test_audio(args.clip)
    b = Bench(args, model, pipe, base_pipe, gen, scale, text, wav, stereo_file(wav))

    t, st, ttft = stages_section(b)
    tables.append(t)
    t, reask = reask_section(b, notes)
    tables.append(t)
    t, scales, sw = sweep_section(b, notes)
    tables.append(t)
    t, low = before_after_section(b, st, ttft, reask, scales, sw, notes)
    tables.append(t)
    tables.append(bandwidth_section(b, st, low))
    tables.append(targets_section(args, cold, st, ttft, reask["same"], sw, low))
    write_results(args, "CPU, embedded default", "float32 (bf16 and int8 weights compared where stated)",
                  tables, notes)
    return 0


if __name__ == "__main__":
    sys.exit(in_worker_thread(main))
