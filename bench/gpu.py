"""GPU benchmark at the real SALMONN shapes with random weights (nothing is downloaded):
Whisper-large-v2 encoder + BEATs (iter3 AS2M cfg) + window Q-Former + Vicuna 7B or 13B with LoRA r8 on q/v.

    python -m bench.gpu                                  # 7B and 13B, fp16 and bf16, 30 s audio
    python -m bench.gpu --shapes 13b --dtypes fp16       # one configuration
    python -m bench.gpu --device cpu --tiny              # smoke test of the same code at tiny shapes

Per configuration, in one run: device-to-device copy bandwidth; encoders ms; time to first token; decode
ms/token and its ratio to the bandwidth limit (weight + KV bytes read per token / copy bandwidth);
peak memory; the same for the official-style path (fp32 encoders under autocast, run again for every
question, 4-beam search through transformers' generate), so each speed-up is a ratio of this run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS, Table, in_worker_thread, append_results, check, environment, timed
from .measure import bytes_per_token, copy_bandwidth, decode_run, fixed_length, median_answer, sweep_times, test_audio

PROMPT = "Describe the audio in detail."
FOLLOW_UP = "What is the speaker's tone?"

LLM_SHAPES = {   # Vicuna v1.1 (LLaMA) shapes
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=320),
}
WHISPER_SHAPES = {
    "large-v2": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120),
    "tiny": dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
}
# BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2 cfg (shared/reference/checkpoint-and-architecture.md §4.1),
# dropouts off as at inference.
BEATS_SHAPES = {
    "iter3": dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                  encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
                  layer_norm_first=False, deep_norm=True, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128,
                  conv_pos_groups=16, relative_position_embedding=True, num_buckets=320, max_distance=800,
                  gru_rel_pos=True, finetuned_model=True, predictor_class=527),
    "tiny": dict(input_patch_size=16, embed_dim=32, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                 encoder_attention_heads=4, deep_norm=True, dropout=0.0, attention_dropout=0.0, conv_pos=16,
                 conv_pos_groups=4, relative_position_embedding=True, num_buckets=32, max_distance=80,
                 gru_rel_pos=True, finetuned_model=True),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(shape: str, dtype: torch.dtype, device: torch.device, tiny: bool, tokens: int, workdir: Path,
          official: bool = True):
    """A SALMONN with random weights at the given shapes, built directly on the device in `dtype`
    (no fp32 copy of a 13B model in host memory), plus fp32 copies of the encoders for the official
    path (None without `official`)."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from model.beats import BEATs, BEATsConfig
    from model.config import GenerateConfig, SALMONNConfig
    from model.encoders import BEATsEncoder, SpeechEncoder
    from model.salmonn import SALMONN
    from model.random_tiny import make_tokenizer

    tokenizer = make_tokenizer(workdir)            # ids < 300, BOS 1, EOS 2 as Vicuna's
    torch.manual_seed(0)
    llm_cfg = LlamaConfig(**LLM_SHAPES[shape], max_position_embeddings=4096, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-6)
    w_cfg = WhisperConfig(**WHISPER_SHAPES["tiny" if tiny else "large-v2"], num_mel_bins=80,
                          max_source_positions=1500, decoder_layers=1, vocab_size=64)
    b_cfg = BEATsConfig(**BEATS_SHAPES["tiny" if tiny else "iter3"])
    with torch.device(device), default_dtype(dtype):
        llm = LlamaForCausalLM(llm_cfg)
        whisper = WhisperEncoder(w_cfg)
        beats = BEATs(b_cfg)
    for module in (llm, whisper):
        module.set_attn_implementation("sdpa")
        module.eval().requires_grad_(False)
    cfg = SALMONNConfig(name=f"SALMONN-{shape} shapes (random weights)", whisper_path="(random)",
                        llama_path="(random)", trim_to_audio=False, device=str(device),
                        dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype],
                        generate=GenerateConfig(max_new_tokens=tokens, num_beams=1))
    speech = SpeechEncoder(whisper, WhisperFeatureExtractor(feature_size=80), name="whisper-large-v2 shapes")
    model = SALMONN(cfg, speech, BEATsEncoder(beats.eval()), llm, tokenizer)
    with torch.no_grad():        # LoRA B starts at zero; give it weights so the adapter path is real work
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)
    model.place(device, dtype).eval()
    if not official:
        return model, None
    official = (copy.deepcopy(speech).to(torch.float32).eval(), copy.deepcopy(model.audio_encoder).to(torch.float32).eval())
    return model, official


def official_answer(model, official, wav: np.ndarray, prompt: str, gen, dtype: torch.dtype):
    """The official inference path: both encoders (fp32 weights) under autocast for every question,
    Q-Former and projection fp32 under autocast, 4-beam search through transformers' generate."""
    from model import decoding
    from model.audio import SAMPLE_RATE, log_mel

    speech_enc, beats_enc = official
    device = model.device
    mel = torch.from_numpy(log_mel([wav], speech_enc.feature_extractor)).to(device)   # preprocessing, fp32
    with torch.autocast(device.type, dtype=dtype), torch.no_grad():
        speech = speech_enc(mel)
        pad = np.pad(wav, (0, max(0, SAMPLE_RATE - len(wav))))
        audio = beats_enc(torch.from_numpy(pad)[None].to(device))
        lengths = [8 * ((1 + (len(pad) - 400) // 160) // 16)]
        tokens, _ = model.qformer_tokens(speech, audio, lengths)
        text = model.prompt.conversation([prompt])
        embeds, mask, _ = model.assemble([tokens[0]], [text])
        out = decoding.beam_search(model, embeds, mask, gen)
    return out


def peak_memory(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def run_config(shape: str, dtype_name: str, args, device: torch.device, bandwidth: float, workdir: Path):
    from model.pipeline import Pipeline

    dtype = DTYPES[dtype_name]
    reps = args.repeats
    t0 = time.perf_counter()
    model, official = build(shape, dtype, device, args.tiny, args.tokens, workdir)
    build_s = time.perf_counter() - t0
    pipe = Pipeline(model)
    gen = fixed_length(pipe.default_generate, args.tokens)
    beam_gen = dataclasses.replace(gen, num_beams=4)
    wav = test_audio(args.audio)
    scale = pipe.trained_scale
    text = pipe.prompt_text(PROMPT)
    res: dict = {"build_s": build_s}

    # encoders (ours: fp16/bf16 weights; official: fp32 weights under autocast), 30 s audio
    with torch.no_grad():
        res["encode_s"], tokens = timed(lambda: model.encode_audio(wav, output_attentions=False), reps, device=device)

        def official_encode():
            from model.audio import log_mel

            mel = torch.from_numpy(log_mel([wav], official[0].feature_extractor)).to(device)
            with torch.autocast(device.type, dtype=dtype):
                speech = official[0](mel)
                audio = official[1](torch.from_numpy(wav)[None].to(device))
                return model.qformer_tokens(speech, audio, [8 * ((1 + (len(wav) - 400) // 160) // 16)])

        res["official_encode_s"], _ = timed(official_encode, reps, device=device)
    embeds, _, _ = model.assemble([tokens.embeds], [text])
    res["prompt_tokens"] = embeds.shape[1]

    # decoding: static cache + CUDA graph (ours, auto) vs dynamic cache eager
    fast = decode_run(model, embeds, gen, scale, reps)
    res["decode_path"] = fast["path"]       # which runner the timed answers used
    eager = decode_run(model, embeds, gen, scale, reps, static=False)
    synced = decode_run(model, embeds, gen, scale, reps, static=False, lookahead=False)
    res.update(prefill_s=fast["prefill_s"], decode_ms=fast["decode_ms_per_token"], second_ms=fast["second_token_ms"],
               eager_decode_ms=eager["decode_ms_per_token"], synced_decode_ms=synced["decode_ms_per_token"])
    context = embeds.shape[1] + args.tokens // 2
    res["bytes_per_token"] = bytes_per_token(model, context)
    res["limit_ms"] = res["bytes_per_token"] / bandwidth * 1000

    # end to end through the pipeline: a new audio (encoders run), and a follow-up question
    fresh = median_answer(pipe, wav, PROMPT, gen, reps, clear="all")
    first = pipe.answer(wav, PROMPT, generate=gen)
    follow = median_answer(pipe, wav, FOLLOW_UP, gen, 1, history=[(PROMPT, first.text)])
    reask = median_answer(pipe, wav, "What do you hear?", gen, 1)
    res.update(ttft_s=fresh["first_token_s"], total_s=fresh["total_s"], followup_ttft_s=follow["first_token_s"],
               followup_total_s=follow["total_s"], reask_ttft_s=reask["first_token_s"],
               reask_total_s=reask["total_s"])
    res["peak_gib"] = peak_memory(device, lambda: (pipe.clear_caches(), pipe.answer(wav, PROMPT, generate=gen)))

    # the official-style path: everything again for every question, beam 4, autocast
    res["official_s"], _ = timed(lambda: official_answer(model, official, wav, PROMPT, beam_gen, dtype),
                                 max(1, reps - 1), device=device)
    res["official_greedy_s"], _ = timed(lambda: official_answer(model, official, wav, PROMPT, gen, dtype),
                                        max(1, reps - 1), device=device)
    res["official_peak_gib"] = peak_memory(device, lambda: official_answer(model, official, wav, PROMPT, beam_gen, dtype))

    # 5-scale sweep vs one answer
    scales = [0.0, scale / 4, scale / 2, 3 * scale / 4, scale]
    res.update({f"sweep_{k}": v for k, v in sweep_times(pipe, wav, PROMPT, gen, scales, max(1, reps - 1)).items()})
    # free this model before the next is built (rebound, not `del`: the closures above name them)
    model = official = pipe = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=["7b", "13b"], choices=["7b", "13b"])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--audio", type=float, default=30.0, help="audio seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the same code")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU smoke runs)")
    return p.parse_args(argv)


def ours_table(args, results: dict, tag: str) -> Table:
    t = Table(f"Ours, batch 1, greedy, {args.audio:g} s audio, {args.tokens} tokens{tag}",
              ["config", "encoders ms", "prefill ms", "TTFT new audio ms", "TTFT follow-up ms",
               "decode ms/token", "bandwidth limit ms/token", "% of limit", "peak GiB"])
    for (shape, dt), r in results.items():
        t.add(f"{shape} {dt}", r["encode_s"] * 1000, r["prefill_s"] * 1000, r["ttft_s"] * 1000,
              r["followup_ttft_s"] * 1000, r["decode_ms"], r["limit_ms"], 100 * r["limit_ms"] / r["decode_ms"],
              r["peak_gib"])
    t.print()
    return t


def official_table(results: dict, tag: str) -> Table:
    o = Table(f"Official-style path vs ours, end to end per question{tag}",
              ["config", "official encoders ms", "official answer s (beam 4)", "official greedy s",
               "ours, new audio s", "ours, follow-up s", "speed-up new audio", "speed-up follow-up",
               "official peak GiB"])
    for (shape, dt), r in results.items():
        o.add(f"{shape} {dt}", r["official_encode_s"] * 1000, r["official_s"], r["official_greedy_s"], r["total_s"],
              r["followup_total_s"], r["official_s"] / r["total_s"], r["official_s"] / r["followup_total_s"],
              r["official_peak_gib"])
    o.print()
    return o


def decode_table(results: dict, tag: str) -> Table:
    d = Table(f"Decode loop before/after, ms/token{tag}",
              ["config", "dynamic cache, host waits each token (before)", "dynamic cache, sync-free loop",
               "static cache + CUDA graph (ours)", "ours, 2nd token (no re-capture)", "speed-up",
               "encoders: fp32 autocast -> LLM dtype"])
    for (shape, dt), r in results.items():
        d.add(f"{shape} {dt}", r["synced_decode_ms"], r["eager_decode_ms"], r["decode_ms"], r["second_ms"],
              f"{r['synced_decode_ms'] / r['decode_ms']:.2f}x", f"{r['official_encode_s'] / r['encode_s']:.2f}x")
    d.print()
    return d


def sweep_table(args, results: dict, tag: str) -> Table:
    s = Table(f"LoRA scale sweep, 5 scales x {args.tokens} tokens{tag}",
              ["config", "one answer s", "5 one by one s", "5 batched s", "batched / one", "batched rerun s"])
    for (shape, dt), r in results.items():
        s.add(f"{shape} {dt}", r["sweep_one_s"], r["sweep_sequential_s"], r["sweep_batched_s"],
              r["sweep_batched_s"] / r["sweep_one_s"], r["sweep_rerun_s"])
    s.print()
    return s


def targets_table(results: dict, tag: str) -> Table:
    g = Table("GPU targets (13B shapes, batch 1, greedy)" + tag, ["config", "target", "measured", "status"])
    for (shape, dt), r in results.items():
        if shape not in ("13b", "tiny"):
            continue
        pct = r["limit_ms"] / r["decode_ms"]
        g.add(f"{shape} {dt}", "decode >= 85 % of bandwidth limit", f"{100 * pct:.0f} %", check(pct, 0.85, "higher"))
        g.add(f"{shape} {dt}", "TTFT, 30 s new audio <= 150 ms", f"{r['ttft_s'] * 1000:.0f} ms",
              check(r["ttft_s"], 0.150, "lower"))
        sp = r["official_s"] / r["total_s"]
        g.add(f"{shape} {dt}", ">= 2x official, end to end", f"{sp:.2f}x", check(sp, 2.0, "higher"))
        ratio = r["sweep_batched_s"] / r["sweep_one_s"]
        g.add(f"{shape} {dt}", "5-scale sweep <= 1.5x one answer", f"{ratio:.2f}x", check(ratio, 1.5, "lower"))
    g.print()
    return g


def result_notes(results: dict, bandwidth: float) -> list[str]:
    notes = [f"device-to-device copy bandwidth (2 x bytes / time): {bandwidth / 1e9:.0f} GB/s",
             "bandwidth limit = (LLM weights except the input embedding + KV cache at mid-answer) / copy bandwidth",
             "random weights; EOS is forbidden until the token count, so every path generates the same number of tokens",
             "official-style: Whisper + BEATs fp32 weights under autocast for every question, 4-beam search "
             "(transformers generate); 'ours': encoders in the LLM dtype once per audio, prompt-prefix KV cache, "
             "greedy static-cache decoding replayed as a CUDA graph"]
    notes += [f"{k[0]} {k[1]}: model built in {r['build_s']:.0f} s; decoding path {r['decode_path']}"
              for k, r in results.items()]
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU here: run on a GPU machine, or `--device cpu --tiny` for a smoke test.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.shapes = ["tiny"]
    bandwidth = copy_bandwidth(device, 0.25 if args.tiny else 2.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results = {}
    for shape in args.shapes:
        for dt in args.dtypes:
            print(f"running {shape} {dt} ...", flush=True)
            results[(shape, dt)] = run_config(shape, dt, args, device, bandwidth, workdir)

    tag = " (tiny shapes)" if args.tiny else ""
    tables = [ours_table(args, results, tag), official_table(results, tag), decode_table(results, tag),
              sweep_table(args, results, tag), targets_table(results, tag)]
    env = environment(device, ", ".join(args.dtypes))
    out = append_results("GPU, SALMONN shapes with random weights" + tag, env, tables,
                         result_notes(results, bandwidth), args.results)
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(in_worker_thread(main))
