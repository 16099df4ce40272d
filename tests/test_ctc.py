"""CTC-guided transcription: prefix scores, the decoding guide, and the head in checkpoints."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from model import decoding
from model.config import GenerateConfig
from model.ctc import CTCGuide, CTCHead, CTCPrefixScores


def _collapse(path, blank):
    out, prev = [], None
    for k in path:
        if k != prev and k != blank:
            out.append(k)
        prev = k
    return tuple(out)


def _walk(scores: CTCPrefixScores, clip: int, labels: tuple[int, ...]):
    """(prefix log-prob psi, log-prob of exactly `labels`) by extending one label at a time."""
    r_n, r_b, psi = scores.initial(clip)
    last = -1
    for c in labels:
        n, b, p = scores.extend([clip], r_n[None], r_b[None], [last], torch.tensor([[c]]))
        r_n, r_b, psi, last = n[0, 0], b[0, 0], float(p[0, 0]), c
    return psi, float(torch.logaddexp(r_n[-1], r_b[-1]))


def test_prefix_scores_equal_sums_over_every_alignment_and_ignore_padding_frames():
    torch.manual_seed(0)
    frames, vocab = 5, 3                       # labels 0..2, blank 3
    x = torch.randn(frames, vocab + 1).double().log_softmax(-1)
    exact: dict[tuple, float] = {}
    for path in itertools.product(range(vocab + 1), repeat=frames):
        labels = _collapse(path, vocab)
        exact[labels] = exact.get(labels, 0.0) + math.exp(sum(float(x[t, k]) for t, k in enumerate(path)))
    # clip 1 is clip 0 followed by 3 padding frames (blank with certainty), as in a batch
    padded = torch.full((frames + 3, vocab + 1), -1.0e4, dtype=torch.float64)
    padded[:, -1] = 0.0
    padded[:frames] = x
    scores = CTCPrefixScores(torch.stack([torch.cat([x, padded[frames:]]), padded]))
    for labels in [(0,), (1, 1), (2, 0, 2), (0, 1, 2, 1)]:
        prefix = sum(p for seq, p in exact.items() if seq[:len(labels)] == labels)
        for clip in (0, 1):
            psi, ended = _walk(scores, clip, labels)
            assert math.exp(psi) == pytest.approx(prefix, rel=1e-6)
            assert math.exp(ended) == pytest.approx(exact.get(labels, 0.0), rel=1e-6, abs=1e-12)


def _spelling_frames(ids: list[int], vocab: int, sure: float = 0.0) -> torch.Tensor:
    """Frame log-probs that spell `ids`: each label then a blank, near-certain."""
    frames = torch.full((2 * len(ids) + 1, vocab + 1), -30.0)
    frames[:, -1] = sure
    for i, k in enumerate(ids):
        frames[2 * i + 1, -1] = -30.0
        frames[2 * i + 1, k] = sure
    return frames.log_softmax(-1)


def test_guide_overrules_a_language_model_that_prefers_other_words():
    """Greedy decoding over fixed LLM scores that favour token 1 everywhere: weight 0.5 follows
    what the audio spells (and ends there); beam rows are matched to prefixes by their tokens."""
    vocab, eos = 12, 11
    want = [4, 4, 7]                           # a repeat needs the blank between
    llm = torch.full((vocab,), -6.0)
    llm[1] = -0.1
    llm[want + [eos]] = -3.0
    for beams in (1, 3):
        guide = CTCGuide(_spelling_frames(want, vocab)[None], beams, 0.5, eos, candidates=vocab)
        rows = [[] for _ in range(beams)]
        for _ in range(6):
            out = guide(torch.tensor(rows, dtype=torch.long), llm.expand(beams, -1).clone())
            nxt = int(out[0].argmax())
            assert torch.isfinite(out[0, eos])
            rows = [r + [nxt] for r in rows][::-1]          # reordered rows find their own prefixes
            if nxt == eos:
                break
        assert rows[0] == want + [eos]
    unguided = [int(llm.argmax())]
    assert unguided != want[:1]


def test_guided_beam_search_and_greedy_decoding_spell_the_audio_tokens(tiny_model):
    """Through transformers' beam search and our greedy loop: with the CTC weight at 1 the tiny
    random LLM answers exactly the words its audio tokens spell under the head."""
    m = tiny_model
    table = m.llama_model.get_input_embeddings().weight.detach().float()
    head = CTCHead(table.shape[1])
    with torch.no_grad():
        head.log_scale.fill_(math.log(60.0))
    text = " dog says hello world"
    ids = m.tokenizer(text, add_special_tokens=False).input_ids
    n = len(ids) + 2
    tokens = torch.stack([v for i in ids for v in (table[i], head.blank.detach().float())])
    frames = head.frame_log_probs([tokens], table)
    # looked up per label, as the dense log-softmax over the whole table would give
    dense = head(tokens, table).log_softmax(-1).double()
    pick = torch.tensor([[ids[0], ids[1], 5]])
    assert torch.allclose(frames.labels(torch.tensor([0]), pick)[0], dense[:, pick[0]].T, atol=1e-5)
    assert torch.allclose(frames.blank[0], dense[:, -1], atol=1e-5)
    # in a batch, a shorter clip's prefix scores are its own: its padding frames count for nothing
    short = tokens[:6]
    batch, alone = CTCPrefixScores(head.frame_log_probs([tokens, short], table)), CTCPrefixScores(head.frame_log_probs([short], table))
    for prefix in [tuple(ids[:1]), tuple(ids[:3]), (ids[1],)]:
        assert _walk(batch, 1, prefix) == pytest.approx(_walk(alone, 0, prefix), abs=1e-4)   # float32 scores
    embeds, mask, _ = m.assemble([tokens.to(m.llm_dtype)], [m.prompt.conversation(["Transcribe the speech."])])
    eos = m.tokenizer.eos_token_id
    with torch.no_grad():
        plain = decoding.beam_search(m, embeds, mask, GenerateConfig(max_new_tokens=n, num_beams=3))[0].tolist()
        beams = decoding.beam_search(m, embeds, mask, GenerateConfig(max_new_tokens=n, num_beams=3),
                              guide=CTCGuide(frames, 3, 1.0, eos, candidates=table.shape[0]))[0].tolist()
        greedy = [int(t[0]) for t in decoding.decode_steps(m, embeds, mask, GenerateConfig(max_new_tokens=n, num_beams=1),
                                                     guide=CTCGuide(frames, 1, 1.0, eos, candidates=table.shape[0]))]
    assert m.decode_text(beams) == text.strip() == m.decode_text(greedy)
    assert m.decode_text(plain) != text.strip()


def test_checkpoints_carry_the_ctc_head_and_load_without_one(tiny_cfg, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.errors import CheckpointError
    from model.salmonn import SALMONN

    model = SALMONN.from_config(tiny_cfg)
    assert model.ctc_head is None
    bare = save_checkpoint(model, tmp_path / "bare.safetensors")
    width = model.llama_model.get_input_embeddings().weight.shape[1]
    model.ctc_head = CTCHead(width)
    with torch.no_grad():
        model.ctc_head.log_scale.fill_(3.5)
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    other = SALMONN.from_config(tiny_cfg)
    load_checkpoint(other, full)
    assert torch.equal(other.ctc_head.blank, model.ctc_head.blank) and float(other.ctc_head.log_scale) == 3.5
    load_checkpoint(other, bare)
    assert other.ctc_head is None
    from safetensors.torch import load_file, save_file

    wrong = load_file(str(full))
    wrong["ctc_head.blank"] = torch.zeros(width + 1)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="ctc_head.blank"):
        load_checkpoint(other, tmp_path / "wrong.safetensors")


def test_pipeline_refuses_a_ctc_weight_without_a_head_and_guides_with_one(tiny_cfg):
    """No head: a clear settings error. With a head that hears only blanks, a fully CTC-guided
    transcript is empty (nothing was spelled), while the plain answer is not."""
    from model.errors import SettingsError
    from model.pipeline import Pipeline
    from model.salmonn import SALMONN
    from tests.test_model_core import tone

    pipe = Pipeline(SALMONN.from_config(tiny_cfg))
    gen = GenerateConfig(max_new_tokens=6, num_beams=2, min_length=0, ctc_weight=0.4)
    with pytest.raises(SettingsError, match="CTC head"):
        pipe.answer(tone(1.0), "Transcribe the speech.", generate=gen)
    assert pipe.info()["ctc_head"] is False
    m = pipe.model

    class Silence(CTCHead):
        def frame_log_probs(self, audio, embeddings):
            frames = torch.full((len(audio), max(len(t) for t in audio), embeddings.shape[0] + 1), -1.0e4)
            frames[..., -1] = 0.0
            return frames

    m.ctc_head = Silence(m.llama_model.get_input_embeddings().weight.shape[1])
    assert pipe.info()["ctc_head"] is True
    for beams in (1, 2):
        plain = GenerateConfig(max_new_tokens=6, num_beams=beams, min_length=0)
        guided = GenerateConfig(max_new_tokens=6, num_beams=beams, min_length=0, ctc_weight=1.0)
        assert pipe.answer(tone(1.0), "Transcribe the speech.", generate=plain).text
        assert pipe.answer(tone(1.0), "Transcribe the speech.", generate=guided).text == ""
    with pytest.raises(SettingsError, match="CTC weight"):
        pipe.answer(tone(1.0), "Transcribe the speech.", generate=GenerateConfig(ctc_weight=1.5))


def test_ctc_head_tool_adds_the_head_to_files_that_share_a_qformer_only(tiny_cfg, tmp_path):
    """`train.ctc_head` writes one head into several checkpoints (their other tensors and metadata
    kept) only when they share the Q-Former and projection the head reads; its development set never
    holds a sentence the evaluation speaks."""
    import json

    from safetensors import safe_open

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.salmonn import SALMONN
    from tests.conftest import randomize_lora
    from train.ctc_head import dev_rows, shared_audio_path, write_head

    model = SALMONN.from_config(tiny_cfg)
    stage2 = save_checkpoint(model, tmp_path / "stage2.safetensors", metadata={"stage": "instruction-tuned"})
    randomize_lora(model, seed=3)                          # stage 3: LoRA only
    stage3 = save_checkpoint(model, tmp_path / "stage3.safetensors")
    with torch.no_grad():
        model.speech_llama_proj.bias.add_(1.0)
    other = save_checkpoint(model, tmp_path / "other.safetensors")
    shared_audio_path([stage2, stage3])
    with pytest.raises(SystemExit, match="speech_llama_proj.bias"):
        shared_audio_path([stage2, other])
    head = CTCHead(model.llama_model.get_input_embeddings().weight.shape[1])
    for path in (stage2, stage3):
        write_head(path, head, {"clips": 3})
    fresh = SALMONN.from_config(tiny_cfg)
    load_checkpoint(fresh, stage3)
    assert torch.equal(fresh.ctc_head.blank, head.blank.detach())
    assert torch.allclose(fresh.speech_llama_proj.bias, model.speech_llama_proj.bias - 1.0)
    with safe_open(str(stage2), "pt") as fh:
        assert fh.metadata()["stage"] == "instruction-tuned" and json.loads(fh.metadata()["ctc_head"]) == {"clips": 3}

    def annotation(folder, texts):
        folder.mkdir()
        rows = [{"path": f"{i}.wav", "text": t, "task": "asr", "Q": ""} for i, t in enumerate(texts)]
        (folder / "eval.json").write_text(json.dumps({"annotation": rows + [{"path": "x.wav", "text": "A dog.",
                                                                              "task": "audiocaption", "Q": ""}]}))
    annotation(tmp_path / "data", ["Hello there.", "Good night."])
    annotation(tmp_path / "data2", ["Good night.", "See you soon.", "Hello again."])
    assert [r["text"] for r in dev_rows(tmp_path / "data2", tmp_path / "data")] == ["See you soon.", "Hello again."]


def test_the_ctc_weight_is_chosen_on_the_development_sets_and_recorded_for_the_card(tmp_path):
    """The lowest mean WER over the sets wins (never 0, unguided); the record keeps the rest of the summary."""
    import json

    from train.ctc_head import choose_weight, record_development

    sets = [{"folder": "data2", "clips": 137, "wer": {"0": 0.05, "0.3": 0.11, "0.5": 0.10, "0.7": 0.12}},
            {"folder": "everyday_dev", "clips": 80, "wer": {"0": 0.90, "0.3": 0.58, "0.5": 0.51, "0.7": 0.49}}]
    assert choose_weight(sets) == 0.5
    assert choose_weight(sets[1:]) == 0.7
    assert choose_weight([{"wer": {"0": 0.2}}]) is None
    summary = tmp_path / "training.json"
    summary.write_text(json.dumps({"parts": {"cores": 2}, "ctc_head": {"parameters": 577}}))
    record_development(summary, {"sets": sets, "chosen": 0.5})
    got = json.loads(summary.read_text())
    assert got["parts"] == {"cores": 2} and got["ctc_head"] == {"parameters": 577, "development": {"sets": sets, "chosen": 0.5}}


def test_the_preset_suggests_the_recorded_choice():
    """The weight the app suggests is the one the development sets chose for the shipped weights."""
    import json

    from model.defaults import ASSETS, CTC_WEIGHT
    from model.ctc import CANDIDATES

    dev = json.loads((ASSETS / "eval" / "training.json").read_text())["ctc_head"]["development"]
    assert (dev["chosen"], dev["top_tokens"]) == (CTC_WEIGHT, CANDIDATES)
