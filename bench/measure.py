"""Measurements shared by the CPU and GPU benchmarks, on an assembled SALMONN (any size, any device).

Every answer is generated with EOS forbidden for its first `tokens` steps (min_length = max_new_tokens),
so each compared path produces exactly the same number of tokens and timings compare like with like.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np
import torch

from model import decoding
from model.audio import SAMPLE_RATE, log_mel
from model.config import GenerateConfig
from model.llm import lora_scale
from model.salmonn import SALMONN

from .common import in_worker_thread, sync, timed


def fixed_length(gen: GenerateConfig, tokens: int, **changes) -> GenerateConfig:
    """Exactly `tokens` new tokens (EOS forbidden until then), greedy unless told otherwise."""
    return dataclasses.replace(gen, max_new_tokens=tokens, min_length=tokens, num_beams=1, do_sample=False,
                               **changes)


def test_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like signal: harmonic tones with a syllable-rate envelope plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    wav = 0.1 * voiced * env + 0.01 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


def stage_times(m: SALMONN, wav: np.ndarray, text: str, gen: GenerateConfig, scale: float,
                repeats: int = 3) -> dict:
    """Seconds per stage for one <= 30 s clip: features, Whisper, BEATs, Q-Former (+ projection),
    LLM prefill, time to first token (prefill + first pick) and decode tokens/s."""
    device = m.device
    out = {}
    chunk = [wav]
    out["features_s"], mel = timed(lambda: torch.from_numpy(log_mel(chunk, m.speech_encoder.feature_extractor)).to(device),
                                   repeats, device=device)
    frames = m.encoder_frames(len(wav))
    with torch.no_grad():
        out["whisper_s"], speech = timed(lambda: m.speech_encoder(mel, frames=None if frames == 1500 else frames),
                                         repeats, device=device)
        audio, lengths = None, None
        if m.audio_encoder is not None:
            pad = np.pad(wav, (0, max(0, SAMPLE_RATE - len(wav))))
            w = torch.from_numpy(pad)[None].to(device)
            out["beats_s"], audio = timed(lambda: m.audio_encoder(w), repeats, device=device)
            lengths = [8 * ((1 + (len(pad) - 400) // 160) // 16)]
        else:
            out["beats_s"] = None
        out["qformer_s"], _ = timed(lambda: m.qformer_tokens(speech, audio, lengths, output_attentions=True),
                                    repeats, device=device)
    tokens = m.encode_audio(wav, output_attentions=False)
    embeds, _, _ = m.assemble([tokens.embeds], [text])
    out["audio_tokens"] = tokens.embeds.shape[0]
    out["prompt_tokens"] = embeds.shape[1]
    run = decode_run(m, embeds, gen, scale, repeats)
    out.update(prefill_s=run["prefill_s"], first_token_s=run["first_token_s"], tokens_per_s=run["tokens_per_s"],
               decode_ms_per_token=run["decode_ms_per_token"])
    return out


def decode_run(m: SALMONN, embeds: torch.Tensor, gen: GenerateConfig, scale, repeats: int = 3,
               static: bool | None = None, lookahead: bool | None = None) -> dict:
    """Our decoder on ready embeddings: prefill, first token, steady decode rate (medians)."""
    from model.fastdecode import DynamicRunner

    rows = embeds.shape[0]
    scale_t = m._scale_tensor([scale] * rows if isinstance(scale, (int, float)) else scale, rows)
    device = m.llm_device
    res = {"prefill_s": [], "first_token_s": [], "second_s": [], "decode_s": [], "total_s": []}
    pos = torch.arange(embeds.shape[1], device=device).expand(rows, -1)
    path: dict = {}          # which runner the timed answers used

    def once():
        with lora_scale(m.llama_model, scale_t), torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            DynamicRunner(m.llama_model, None).prefill(embeds, pos)
            sync(device)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            arrivals = [time.perf_counter() for _ in decoding.decode_steps(m, embeds, None, gen, static=static,
                                                                            lookahead=lookahead, trace=path)]
            sync(device)
            return prefill, arrivals[0] - t0, time.perf_counter() - t0, np.diff(arrivals)

    for i in range(repeats + 1):
        prefill, first, total, gaps = in_worker_thread(once)
        if i == 0:      # warm-up (allocator, caches)
            continue
        res["prefill_s"].append(prefill)
        res["first_token_s"].append(first)
        # steady state: the median gap between tokens, past the second token's (a graph capture, when
        # the static runner is new; reported on its own so a capture per answer shows)
        res["second_s"].append(float(gaps[0]) if len(gaps) else math.nan)
        res["decode_s"].append(float(np.median(gaps[1:] if len(gaps) > 2 else gaps)) if len(gaps) else math.nan)
        res["total_s"].append(total)
    med = {k: float(np.median(v)) for k, v in res.items()}
    med["decode_ms_per_token"] = med.pop("decode_s") * 1000
    med["second_token_ms"] = med.pop("second_s") * 1000
    med["tokens_per_s"] = 1000 / med["decode_ms_per_token"] if med["decode_ms_per_token"] else math.inf
    med["tokens"] = len(gaps) + 1
    med["path"] = path
    return med


def hf_generate_run(m: SALMONN, embeds: torch.Tensor, gen: GenerateConfig, scale: float, repeats: int = 3,
                    num_beams: int = 1) -> float:
    """Seconds for transformers' generate() on the same embeddings and token count (the stock path)."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    g = dataclasses.replace(gen, num_beams=num_beams)

    def run():
        with lora_scale(m.llama_model, scale), torch.no_grad():
            return decoding.beam_search(m, embeds, mask, g) if num_beams > 1 else m.llama_model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=g.max_new_tokens,
                min_new_tokens=g.min_length, do_sample=False, num_beams=1,
                repetition_penalty=g.repetition_penalty, eos_token_id=m.tokenizer.eos_token_id,
                pad_token_id=m.tokenizer.eos_token_id)

    seconds, _ = timed(run, repeats, device=m.llm_device)
    return seconds


def set_attention(m: SALMONN, name: str) -> None:
    base = m.llama_model.get_base_model() if hasattr(m.llama_model, "get_base_model") else m.llama_model
    base.set_attn_implementation(name)


def median_answer(pipe, audio, prompt: str, gen: GenerateConfig, repeats: int, clear: str = "none",
                  **kwargs) -> dict:
    """Median timings of pipe.answer; `clear` = 'all' (no caches: a new audio each time), 'prefix'
    (audio tokens kept, prompt prefixes dropped) or 'none'."""
    rows = []
    for _ in range(repeats):
        if clear == "all":
            pipe.clear_caches()
        elif clear == "prefix" and pipe.prefix_cache is not None:
            pipe.prefix_cache.clear()
        t0 = time.perf_counter()
        ans = pipe.answer(audio, prompt, generate=gen, **kwargs)
        sync()
        t = dict(ans.timings)
        t["wall_s"] = time.perf_counter() - t0
        rows.append(t)
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    med = {k: float(np.median([r[k] for r in rows])) for k in keys}
    med["audio_cached"] = rows[-1].get("audio_cached")
    med["text"] = ans.text
    return med


def sweep_times(pipe, audio, prompt: str, gen: GenerateConfig, scales: Sequence[float], repeats: int,
                full: bool = True) -> dict:
    """One answer vs the same N answers one by one vs one batched pass (audio tokens cached, no
    prompt prefix cached), and a batched rerun that reuses the cached prefixes (full=False: one
    answer and the batched pass only)."""
    pipe.encode(audio)

    def fresh():
        if pipe.prefix_cache is not None:
            pipe.prefix_cache.clear()

    def one():
        fresh()
        return pipe.answer(audio, prompt, lora_scale=scales[-1], generate=gen)

    def sequential():
        fresh()
        return [pipe.answer(audio, prompt, lora_scale=s, generate=gen) for s in scales]

    def batched():
        fresh()
        return pipe.answer_many(audio, prompt, lora_scales=list(scales), generate=gen)

    out = {}
    out["one_s"], _ = timed(one, repeats)
    out["batched_s"], bat = timed(batched, repeats)
    if not full:
        return out
    out["sequential_s"], seq = timed(sequential, repeats)
    fresh()
    pipe.answer_many(audio, prompt, lora_scales=list(scales), generate=gen)
    out["rerun_s"], _ = timed(lambda: pipe.answer_many(audio, prompt, lora_scales=list(scales), generate=gen),
                              repeats, warmup=0)
    out["same_texts"] = [a.text for a in seq] == [a.text for a in bat]
    return out


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Memory copy bandwidth on `device` in bytes/s: 2 x bytes (read + write) / time, median of 10."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), repeats=10, warmup=2, device=device)
    del src, dst
    return 2 * n * 4 / seconds


def bytes_per_token(model, context: int) -> int:
    """Bytes the decoder must read per generated token: every LLM weight except an untied input
    embedding table (one row is gathered), plus the KV cache at `context` positions."""
    llm = model.llama_model
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in llm.parameters() if p is not embed or p is head)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    for module in llm.modules():       # torch's dynamic-int8 Linear keeps its weights packed, not as parameters
        if isinstance(module, Int8Linear):
            w, b = module._weight_bias()
            weights += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                weights += w.q_per_channel_scales().numel() * 4     # one float scale per output channel
    cfg = (llm.get_base_model() if hasattr(llm, "get_base_model") else llm).config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * embed.element_size()
    return weights + kv
