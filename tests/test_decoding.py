"""Decoding (model/decoding.py through the pipeline): streamed answers equal greedy ones, per-row LoRA
scales equal separate runs, beam search and sampling are wired, the streamed beam prefix is only text
the final answer keeps, and Stop ends an answer early."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from model import decoding
from model.config import GenerateConfig
from model.llm import lora_scale

GREEDY = GenerateConfig(max_new_tokens=12, num_beams=1)


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


# ---------------------------------------------------------------- window maths
def test_per_row_lora_scales_equal_separate_runs(tiny_pipeline):
    wav = tone(2.0, freq=300)
    batched = tiny_pipeline.answer_many(wav, "Describe the audio.", [0.0, 1.0, 4.0], generate=GREEDY)
    single = [tiny_pipeline.answer(wav, "Describe the audio.", lora_scale=s, generate=GREEDY) for s in (0.0, 1.0, 4.0)]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.lora_scale for a in batched] == [0.0, 1.0, 4.0]
    assert len({a.text for a in single}) > 1      # the scale really changes the answer


# ---------------------------------------------------------------- prompt layout
def test_stream_equals_greedy_and_cached_reask_equals_fresh(tiny_cfg, tiny_pipeline):
    from model.pipeline import Pipeline

    wav = tone(2.5, freq=500)
    events = list(tiny_pipeline.stream(wav, "Describe the audio.", generate=GREEDY))
    streamed = "".join(e.delta for e in events)
    final = events[-1].answer
    assert events[-1].done and streamed.strip() == final.text
    m = tiny_pipeline.model
    embeds, mask, _ = m.assemble([m.encode_audio(wav).embeds], [final.prompt])
    with lora_scale(m.llama_model, final.lora_scale):
        ref = m.llama_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     num_beams=1, eos_token_id=m.tokenizer.eos_token_id,
                                     pad_token_id=m.tokenizer.eos_token_id, min_new_tokens=1)
    assert final.text == m.decode_text(ref[0].tolist())
    # re-ask: encoders are skipped, the answer is identical to a fresh pipeline's
    again = tiny_pipeline.answer(wav, "Describe the audio.", generate=GREEDY)
    assert again.timings["audio_cached"] is True and again.text == final.text
    assert events[-1].answer.timings["audio_cached"] is False
    fresh = Pipeline(tiny_pipeline.model)
    assert fresh.answer(wav, "Describe the audio.", generate=GREEDY).text == final.text


def test_beam_search_and_sampling_are_wired(tiny_pipeline):
    wav = tone(1.0)
    beams = tiny_pipeline.answer(wav, "Describe.", generate=GenerateConfig(max_new_tokens=8, num_beams=3))
    assert beams.num_tokens > 0
    a = tiny_pipeline.answer(wav, "Describe.", generate=GenerateConfig(max_new_tokens=8, num_beams=1, do_sample=True, seed=1, temperature=1.5))
    b = tiny_pipeline.answer(wav, "Describe.", generate=GenerateConfig(max_new_tokens=8, num_beams=1, do_sample=True, seed=1, temperature=1.5))
    assert a.text == b.text      # seeded sampling is reproducible


def test_agreed_prefix_reports_what_every_beam_that_can_still_win_starts_with():
    from model.decoding import AgreedPrefix

    def logp(row0: dict, row1: dict) -> torch.Tensor:
        s = torch.full((2, 10), -20.0)
        for r, d in enumerate((row0, row1)):
            for tok, v in d.items():
                s[r, tok] = v
        return s

    def run(eos_after_5: float) -> list[list[int]]:
        got: list[list[int]] = []
        watch = AgreedPrefix(num_beams=2, eos=0, sampling=False, on_prefix=got.append)
        watch(torch.zeros((2, 0), dtype=torch.long), logp({7: -0.1, 5: -1.0, 6: -3.0, 8: -3.0}, {}))
        # beams [7] (score -0.1) and [5] (-1.0); [7] goes on with 3 or 4; [5] may end here
        watch(torch.tensor([[7], [5]]), logp({3: -0.1, 4: -0.2, 1: -3.0, 2: -3.0}, {0: eos_after_5, 9: -9.0}))
        watch(torch.tensor([[7, 3], [7, 4]]), logp({1: -0.1, 2: -0.5}, {1: -0.1, 2: -0.5}))
        watch(torch.tensor([[7, 3, 1], [7, 4, 1]]), logp({2: -0.1}, {2: -0.1}))
        return got

    # "[5] then EOS" scores -1.5, among the 4 best candidates: a finished answer that may still win,
    # so nothing is sure yet, even when all live beams start with 7
    assert run(eos_after_5=-0.5) == []
    # at -5.0 its EOS misses the cut (its row's best token all the same): the live beams' prefix counts
    assert run(eos_after_5=-5.0) == [[7]]
    # beam sampling may draw any possible token, EOS included
    got: list[list[int]] = []
    sampled = AgreedPrefix(num_beams=2, eos=0, sampling=True, on_prefix=got.append)
    never_ends = logp({1: -0.1}, {1: -0.1})
    never_ends[:, 0] = -float("inf")
    sampled(torch.tensor([[7, 3], [7, 3]]), never_ends)
    sampled(torch.tensor([[7, 3, 1], [7, 3, 2]]), logp({1: -0.1}, {1: -0.1}))
    sampled(torch.tensor([[7, 3, 1, 5], [7, 3, 1, 5]]), logp({1: -0.1}, {1: -0.1}))
    assert got == [[7, 3]]


def test_beam_search_streams_only_text_the_final_answer_keeps(tiny_pipeline):
    """Streamed beam-search text is always a prefix of the answer, which is what beam search returns
    without streaming."""
    m = tiny_pipeline.model
    streamed_any = False
    for k, prompt in enumerate(["Describe.", "What do you hear?", "Transcribe the speech.", "Tell a story."]):
        wav = tone(1.0, freq=300 + 150 * k)
        gen = GenerateConfig(max_new_tokens=14, num_beams=3, repetition_penalty=1.0)
        events = list(tiny_pipeline.stream(wav, prompt, generate=gen))
        final = events[-1]
        assert final.done and all(not e.done for e in events[:-1])
        assert all(final.text.startswith(e.text) for e in events)
        assert "".join(e.delta for e in events) == final.text
        streamed_any |= len(events) > 1
        embeds, mask, _ = m.assemble([tiny_pipeline.encode(wav).tokens.embeds], [tiny_pipeline.prompt_text(prompt, [])])
        with torch.no_grad():
            plain = decoding.beam_search(m, embeds, mask, gen)[0].tolist()
        assert final.text == m.decode_text(plain)
    assert streamed_any


def test_stop_event_ends_generation_early(tiny_pipeline):
    import threading

    stop = threading.Event()
    stop.set()
    answer = tiny_pipeline.answer(tone(1.0), "Describe.", generate=GenerateConfig(max_new_tokens=50, num_beams=1), stop=stop)
    assert answer.stopped and answer.num_tokens <= 1


def test_bad_words_are_never_emitted_greedy_or_beam(tiny_pipeline):
    """`bad_words` (as vLLM's): none of a word's token sequences appears in the answer, which takes other
    tokens instead, in greedy decoding (the Picker) and in beam search (transformers' bad_words_ids)."""
    m = tiny_pipeline.model
    tok = m.tokenizer
    embeds, mask, _ = m.assemble([m.encode_audio(tone(1.5, freq=700)).embeds], [tiny_pipeline.prompt_text("Write a story.")])

    def answer(gen):
        *_, last = decoding.generate(m, embeds, mask, gen)
        return last.tokens[0]

    for beams in (1, 3):
        gen = GenerateConfig(max_new_tokens=16, num_beams=beams)
        before = answer(gen)
        words = [w for w in dict.fromkeys(tok.decode([t]).strip() for t in before)
                 if w.isalpha() and any(seq == [t] for seq in decoding.bad_words_ids(tok, [w]) for t in before)][:2]
        assert words, tok.decode(before)
        after = answer(dataclasses.replace(gen, bad_words=tuple(words)))
        banned = decoding.bad_words_ids(tok, words)
        assert after != before
        assert not any(after[i:i + len(seq)] == seq for seq in banned for i in range(len(after))), (words, after)


def test_bad_words_are_checked(tiny_pipeline):
    import pytest

    from model.errors import SettingsError

    for bad in ("fox", ["fox", 3], ["fox", " "], ["x" * 51], ["w"] * 257):
        with pytest.raises(SettingsError, match="Bad words"):
            tiny_pipeline.check_generate(GenerateConfig(bad_words=bad))
    assert tiny_pipeline.check_generate(GenerateConfig(bad_words=[" fox "])).bad_words == ("fox",)
