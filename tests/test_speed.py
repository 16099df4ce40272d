"""Every speed optimisation gives the same answers as the plain path (correctness, not time),
and a smoke run of the CPU benchmark on the tiny test model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model import decoding
from model.config import GenerateConfig
from model.kvcache import PrefixCache, common_prefix, sequence_ids
from model.llm import lora_scale
from model.pipeline import Pipeline
from tests.conftest import randomize_lora

GREEDY = GenerateConfig(max_new_tokens=10, num_beams=1)
# a fixed length (EOS forbidden) so cached answers are long enough to feed follow-up turns
LONG = GenerateConfig(max_new_tokens=10, num_beams=1, min_length=10)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def tokens_of(model, embeds, gen, scale, **kwargs) -> list[list[int]]:
    with lora_scale(model.llama_model, scale):
        return [step.tolist() for step in decoding.decode_steps(model, embeds, None, gen, **kwargs)]


# ---------------------------------------------------------------- decoding paths
@pytest.mark.parametrize("rows", [1, 3])
def test_static_cache_decoding_equals_dynamic(tiny_model, rows):
    """The static-cache runner (what CUDA graphs replay on GPU) gives the dynamic cache's tokens."""
    m = tiny_model
    enc = m.encode_audio(tone(1.5, 300), output_attentions=False)
    text = m.prompt.conversation(["Describe the audio."])
    embeds, _, _ = m.assemble([enc.embeds] * rows, [text] * rows)
    scales = m._scale_tensor([0.0, 1.0, 4.0][:rows] if rows > 1 else [4.0], rows)
    gen = GenerateConfig(max_new_tokens=12, num_beams=1, min_length=12, repetition_penalty=1.3)
    dynamic = tokens_of(m, embeds, gen, scales, static=False)
    static = tokens_of(m, embeds, gen, scales, static=True)
    assert static == dynamic
    # queueing step t+1 before handing out token t (the CUDA default) changes nothing either
    assert tokens_of(m, embeds, gen, scales, static=False, lookahead=True) == dynamic
    assert len(dynamic) == 12
    # starting from a reused prefix (keys/values of the first positions) gives the same tokens too
    record = {}
    with lora_scale(m.llama_model, scales):
        list(decoding.decode_steps(m, embeds, None, gen, static=False, record=record))
    cut = embeds.shape[1] - 3
    past = [(k[:, :, :cut], v[:, :, :cut]) for k, v in record["kv"]]
    for static in (False, True):
        assert tokens_of(m, embeds[:, cut:], gen, scales, static=static, past=past) == dynamic


def test_decode_record_covers_every_fed_position(tiny_model):
    m = tiny_model
    enc = m.encode_audio(tone(1.0), output_attentions=False)
    embeds, _, _ = m.assemble([enc.embeds], [m.prompt.conversation(["Describe."])])
    record = {}
    steps = list(decoding.decode_steps(m, embeds, None, LONG, record=record))
    assert record["fed"] == len(steps) - 1          # the last token is yielded, never fed
    assert record["kv"][0][0].shape[2] == embeds.shape[1] + record["fed"]


@pytest.mark.parametrize("static", [False, True])
def test_min_length_and_eos_on_every_path(tiny_model, static):
    """EOS is forbidden for the first min_length steps; a row that emitted EOS keeps yielding EOS
    while the other rows go on. Row 0's head prefers EOS up to step 3 only, row 1's never."""
    m = copy.deepcopy(tiny_model)
    eos = m.tokenizer.eos_token_id
    base = m.llama_model.get_base_model()

    class PreferEOS(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head
            self.calls = 0          # call k gives the logits of answer token k

        def forward(self, h):
            logits = self.head(h)
            if self.calls <= 3:
                logits[0, ..., eos] += 1e4
            self.calls += 1
            return logits

    base.lm_head = PreferEOS(base.lm_head)
    embeds, _, _ = m.assemble([m.encode_audio(tone(1.0), output_attentions=False).embeds] * 2,
                              [m.prompt.conversation(["Describe."])] * 2)
    gen = GenerateConfig(max_new_tokens=8, num_beams=1, min_length=3)
    steps = [s.tolist() for s in decoding.decode_steps(m, embeds, None, gen, static=static)]
    row0, row1 = [s[0] for s in steps], [s[1] for s in steps]
    assert eos not in row0[:3] and row0[3:] == [eos] * 5
    assert len(steps) == 8 and eos not in row1


# ---------------------------------------------------------------- prompt-prefix KV cache
def test_cached_prefix_answers_equal_uncached(tiny_model):
    cached, plain = Pipeline(tiny_model), Pipeline(tiny_model, prefix_cache=False)
    wav = tone(2.0, 350)
    q1, q2 = "Describe the audio.", "What do you hear?"

    def both(prompt, **kw):
        a, b = cached.answer(wav, prompt, generate=LONG, **kw), plain.answer(wav, prompt, generate=LONG, **kw)
        assert a.text == b.text and a.num_tokens == b.num_tokens
        assert b.timings["reused_tokens"] == 0
        return a

    first = both(q1)
    assert first.timings["reused_tokens"] == 0
    again = both(q1)                                  # re-ask: only the last prompt position runs again
    assert again.timings["reused_tokens"] == again.timings["prompt_tokens"] - 1
    other = both(q2)                                  # new question: the audio and the text before it are reused
    n_audio = tiny_model.encode_audio(wav).embeds.shape[0]
    assert n_audio < other.timings["reused_tokens"] < other.timings["prompt_tokens"] - 1
    follow = both("And the pitch?", history=[(q1, first.text)])   # follow-up: the first turn (+ its answer) is reused
    assert follow.timings["reused_tokens"] >= first.timings["prompt_tokens"]
    scaled = both(q1, lora_scale=1.0)                 # another LoRA scale: other keys/values, nothing reused
    assert scaled.timings["reused_tokens"] == 0
    streamed = list(cached.stream(wav, q1, generate=LONG))
    assert streamed[-1].answer.text == first.text
    for entry in cached.prefix_cache._entries.values():    # every entry covers exactly its ids
        assert entry.kv[0][0].shape[2] == len(entry.ids)


def test_scale_sweep_batched_and_cached_equals_separate_runs(tiny_model):
    cached, plain = Pipeline(tiny_model), Pipeline(tiny_model, prefix_cache=False)
    wav = tone(1.5, 600)
    scales = [0.0, 1.0, 2.0, 4.0]
    separate = [plain.answer(wav, "Describe the audio.", lora_scale=s, generate=LONG).text for s in scales]
    assert len(set(separate)) > 1                       # the scale really changes the answer
    batched = cached.answer_many(wav, "Describe the audio.", lora_scales=scales, generate=LONG)
    assert [a.text for a in batched] == separate
    assert all(a.timings["reused_tokens"] == 0 for a in batched)
    rerun = cached.answer_many(wav, "Describe the audio.", lora_scales=scales, generate=LONG)  # scale lab rerun
    assert [a.text for a in rerun] == separate
    assert all(a.timings["reused_tokens"] == a.timings["prompt_tokens"] - 1 for a in rerun)
    # a chat answer at one scale reuses that row's prefix from the sweep
    single = cached.answer(wav, "Describe the audio.", lora_scale=2.0, generate=LONG)
    assert single.text == separate[2] and single.timings["reused_tokens"] > 0


def test_padded_batch_equals_separate_runs_and_feeds_the_cache(tiny_model):
    cached, plain = Pipeline(tiny_model), Pipeline(tiny_model, prefix_cache=False)
    wav = tone(1.0, 250)
    prompts = ["Describe the audio.", "Write a very long and detailed story about the sound, please."]
    batched = cached.answer_many(wav, prompts, lora_scales=[4.0, 1.0], generate=GREEDY)
    separate = [plain.answer(wav, p, lora_scale=s, generate=GREEDY).text for p, s in zip(prompts, [4.0, 1.0])]
    assert [a.text for a in batched] == separate
    # the shorter (left-padded) row was stored without its padding: a re-ask reuses it and agrees
    again = cached.answer(wav, prompts[0], lora_scale=4.0, generate=GREEDY)
    assert again.text == separate[0] and again.timings["reused_tokens"] == again.timings["prompt_tokens"] - 1
    # rows of different lengths never reuse cached prefixes (left padding would misalign them)
    rerun = cached.answer_many(wav, prompts, lora_scales=[4.0, 1.0], generate=GREEDY)
    assert [a.text for a in rerun] == separate and rerun[0].timings["reused_tokens"] == 0


def test_prefix_cache_lookup_and_bounds():
    def kv(n, layers=2):
        return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4)) for _ in range(layers)]

    per_position = 2 * 2 * 2 * 4 * 4    # layers * (k, v) * heads * dim * bytes
    cache = PrefixCache(max_entries=3, max_bytes=40 * per_position)
    ids = sequence_ids([5, 6], 3, [7, 8])
    assert ids == (5, 6, -1, -2, -3, 7, 8) and common_prefix(ids, (5, 6, -1, 9)) == 3
    cache.store("a", 4.0, ids, kv(len(ids)))
    assert cache.lookup("a", 1.0, ids) == (None, 0)             # another scale
    assert cache.lookup("b", 4.0, ids) == (None, 0)             # another audio
    entry, n = cache.lookup("a", 4.0, ids)
    assert n == len(ids) - 1                                     # the last position always runs again
    assert cache.lookup("a", 4.0, (5, 6, -1, -2, -3, 9))[1] == 5
    cache.store("a", 4.0, ids + (1, 2), kv(len(ids) + 2))       # extends the first: replaces it
    assert len(cache) == 1
    for i in range(5):                                           # LRU by count
        cache.store(f"x{i}", 4.0, (i, i), kv(2))
    assert len(cache) == 3 and cache.lookup("a", 4.0, ids)[0] is None
    cache.store("big", 4.0, tuple(range(30)), kv(30))            # LRU by bytes
    assert cache.nbytes <= cache.max_bytes
    assert cache.lookup("big", 4.0, tuple(range(30)))[1] == 29
    cache.store("huge", 4.0, tuple(range(50)), kv(50))          # larger than the budget: not kept
    assert cache.lookup("huge", 4.0, tuple(range(50)))[0] is None


# ---------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_fp32(tiny_model, dtype):
    """Encoders and LLM in bf16/fp16 (Q-Former and projection stay fp32, as placed on GPU)."""
    ref = tiny_model
    low = copy.deepcopy(ref).place(torch.device("cpu"), dtype)
    wav = tone(2.0, 420)
    with torch.no_grad():
        a, b = ref.encode_audio(wav, output_attentions=False), low.encode_audio(wav, output_attentions=False)
        assert b.embeds.dtype == dtype
        rel = (a.embeds - b.embeds.float()).norm() / a.embeds.norm()
        assert rel < 0.02
        text = ref.prompt.conversation(["Describe the audio."])
        target = ref.tokenizer("the dog says hello", add_special_tokens=False).input_ids
        lp_ref = ref.target_logprobs([a.embeds], [text], [target], 4.0)[0]
        lp_low = low.target_logprobs([b.embeds], [text], [target], 4.0)[0]
    # per-token log-probabilities of a reference answer within 0.15 nats (random weights with large logits)
    assert torch.allclose(lp_low.float(), lp_ref, atol=0.15, rtol=0.02), (lp_low, lp_ref)


def test_cpu_int8_weights_stay_close_to_fp32_and_keep_lora_live(tiny_cfg):
    """--8bit on the CPU: the frozen LLM Linears become int8 (LoRA stays float, so the scale slider
    still works); reference-answer log-probabilities stay close to fp32."""
    from model.salmonn import SALMONN

    torch.manual_seed(0)      # the Q-Former's random init must not depend on which tests ran before
    ref = SALMONN.from_config(tiny_cfg)
    randomize_lora(ref)
    q8 = SALMONN.from_config(tiny_cfg.replace(load_in_8bit=True))
    trained = ref.trainable_parameters()
    with torch.no_grad():
        for name, param in q8.trainable_parameters().items():      # the same LoRA, Q-Former, projection
            param.copy_(trained[name])
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    quantized = [n for n, m in q8.llama_model.named_modules() if isinstance(m, Int8Linear)]
    assert any(n.endswith("q_proj.base_layer") for n in quantized) and any(n.endswith("lm_head") for n in quantized)
    assert not any("lora_" in n for n in quantized)
    wav = tone(2.0, 420)
    with torch.no_grad():
        emb = ref.encode_audio(wav, output_attentions=False).embeds
        text = ref.prompt.conversation(["Describe the audio."])
        target = ref.tokenizer("the dog says hello", add_special_tokens=False).input_ids
        lp_ref = ref.target_logprobs([emb], [text], [target], 4.0)[0]
        lp_q8 = q8.target_logprobs([emb], [text], [target], 4.0)[0]
        lp_q8_off = q8.target_logprobs([emb], [text], [target], 0.0)[0]
    assert torch.allclose(lp_q8, lp_ref, atol=0.15, rtol=0.02), (lp_q8, lp_ref)
    assert not torch.allclose(lp_q8_off, lp_q8, atol=1e-3)          # LoRA scale still changes the answer
    with pytest.raises(Exception, match="float32"):
        SALMONN.from_config(tiny_cfg.replace(load_in_8bit=True, dtype="bfloat16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_loop_has_no_device_syncs_on_cuda(tiny_model):
    m = copy.deepcopy(tiny_model).place(torch.device("cuda"), torch.float16)
    embeds, _, _ = m.assemble([m.encode_audio(tone(1.0), output_attentions=False).embeds],
                              [m.prompt.conversation(["Describe."])])
    for static in (False, True):
        steps = decoding.decode_steps(m, embeds, None, LONG, static=static)
        next(steps)
        next(steps)                              # graph captured / caches warm
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in steps:
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- the CPU benchmark, smoke run
def test_cpu_benchmark_smoke(tiny_root, tmp_path):
    from bench.common import in_worker_thread
    from bench.cpu import main

    results = tmp_path / "RESULTS.md"
    assert in_worker_thread(main, ["--tiny-test", str(tiny_root), "--tokens", "3", "--repeats", "1", "--clip", "2",
                 "--results", str(results)]) == 0
    text = results.read_text()
    for heading in ("App cold start", "Per-stage times", "Re-asking about the same audio", "LoRA scale sweep",
                    "Decoding before/after", "CPU targets"):
        assert heading in text
    assert "cached-prefix answers identical to uncached ones in this run: True" in text
    assert "batched sweep answers identical to one-by-one answers in this run: True" in text
    assert "fp32 -> int8 weights (--8bit): decode tokens/s" in text


def test_bytes_per_token_counts_packed_int8_weights(tiny_cfg):
    """The decode-vs-bandwidth table divides by each model's own bytes: int8 layers keep their weights
    packed (not as parameters), so they must be counted from the packed tensors, about 1 byte each."""
    from bench.measure import bytes_per_token
    from model.llm import quantize_int8_cpu
    from model.salmonn import SALMONN

    model = SALMONN.from_config(tiny_cfg)
    fp32 = bytes_per_token(model, 0)
    linear = sum(m.weight.numel() for n, m in model.llama_model.named_modules()
                 if type(m) is torch.nn.Linear and "lora_" not in n)
    assert quantize_int8_cpu(model.llama_model) > 0
    int8 = bytes_per_token(model, 0)
    assert int8 < fp32 - 2.5 * linear           # ~3 of each Linear weight's 4 bytes are gone
    assert int8 >= linear                        # ...but the packed bytes are counted
