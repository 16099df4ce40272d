"""The training code lowers the loss, resumes exactly, and follows the official schedule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from model.salmonn import SALMONN, answer_nll, token_logprobs
from train.trainer import Trainer, TrainConfig, encode_clips, load_annotations, lr_at, param_groups, prompt_for


@pytest.fixture()
def tiny_data(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    words = ["one beep", "two beeps", "a dog", "the rain"]
    for i in range(8):
        freq = 300 + 150 * (i % 4)
        t = np.arange(int(16000 * (1.0 + 0.25 * i))) / 16000
        wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(tmp_path / f"clip{i}.wav", wav.astype(np.float32), 16000)
        rows.append({"path": f"clip{i}.wav", "text": words[i % 4], "task": "audiocaption"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": rows}))
    return ann


def test_schedule_matches_official_recipe():
    cfg = TrainConfig(steps=90, init_lr=3e-5, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=30)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(15, cfg) == pytest.approx(1e-6 + (3e-5 - 1e-6) / 2)
    # cosine counted from step 0 over all steps (not from the end of warm-up), as the official code
    assert lr_at(45, cfg) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert lr_at(90, cfg) == pytest.approx(1e-5)


def test_weight_decay_groups(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.05)
    names = {id(p): n for n, p in tiny_model.trainable_parameters().items()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("lora_A" in names[id(p)] for p in decay["params"])
    assert not any("ln_speech" in names[id(p)] or names[id(p)].endswith("bias") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"window_qformer.ln_speech.weight", "speech_llama_proj.bias"}


def test_prompt_selection_official_style():
    import random

    rng = random.Random(0)
    row = {"task": "QA", "Q": "what is it?"}
    prompts = {"QA": ["<Speech><SpeechHere></Speech> Answer: {}"]}
    assert prompt_for(row, prompts, rng) == "<Speech><SpeechHere></Speech> Answer: what is it?"
    assert prompt_for({"task": "asr", "prompt": "Transcribe."}, None, rng) == "<Speech><SpeechHere></Speech> Transcribe."


def test_training_lowers_loss_and_resumes(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)      # the Q-Former's random init must not depend on which tests ran before
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)
    feats = encode_clips(model, [r["path"] for r in rows], cache_file=tmp_path / "feats.pt")
    assert (tmp_path / "feats.pt").is_file() and len(feats) == 8
    # features are kept only over the windows that hold audio? (trim off here: all 88 windows)
    assert feats[rows[0]["path"]][0].shape[0] == 88 * 17
    prompts = {"audiocaption": ["Please describe the audio."]}
    cfg = TrainConfig(steps=30, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                      log_every=5, save_every=15, seed=0)
    trainer = Trainer(model, rows, feats, cfg, tmp_path / "run", prompts=prompts, log=lambda m: None)
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        before = float(trainer.loss_on(rows))
    history = trainer.train()
    with torch.no_grad():
        after = float(trainer.loss_on(rows))
    assert after < before * 0.85, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["lm"] == pytest.approx(history[-1]["loss"])   # the LM term alone is logged too

    # resume: a fresh trainer continues from step 30 with the saved weights and optimiser
    resumed_model = SALMONN.from_config(tiny_cfg)
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 35})
    t2 = Trainer(resumed_model, rows, feats, cfg2, tmp_path / "run", prompts=prompts, log=lambda m: None)
    assert Trainer.saved_step(tmp_path / "run") == 30 and Trainer.saved_step(tmp_path / "none") == 0
    assert t2.resume() and t2.step == 30
    for (n, a), (_, b) in zip(model.trainable_parameters().items(), resumed_model.trainable_parameters().items()):
        assert torch.equal(a, b), n
    assert t2.opt.state_dict()["state"].keys() == trainer.opt.state_dict()["state"].keys()
    t2.train()
    assert t2.step == 35


def test_ctc_alignment_loss_rewards_tokens_that_spell_the_transcript():
    from model.ctc import CTCHead
    from train.trainer import ctc_alignment_loss

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(40, 16, generator=gen)
    head = CTCHead(16)
    target = [3, 7, 7, 12]
    blank = head.blank.detach()
    # audio tokens pointing at the spoken tokens (a blank between the repeated 7s), vs unrelated ones
    spelled = torch.stack([table[3], table[7], blank, table[7], table[12], blank])
    unrelated = torch.stack([table[i] for i in (20, 21, 22, 23, 24, 25)])
    good = ctc_alignment_loss(head, [spelled], [target], table)
    bad = ctc_alignment_loss(head, [unrelated], [target], table)
    assert float(good) < 0.5 * float(bad)
    # too few audio tokens for the transcript: no alignment exists, so it adds nothing (not inf/nan)
    short = spelled[:2].clone().requires_grad_(True)
    loss = ctc_alignment_loss(head, [short], [target], table)
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(short.grad).all()


def test_ctc_weight_trains_the_alignment_and_resumes_its_head(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)
    for r in rows:
        r["task"] = "asr"
    feats = encode_clips(model, [r["path"] for r in rows])
    cfg = TrainConfig(steps=24, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                      log_every=6, save_every=24, seed=0, ctc_weight=1.0)
    trainer = Trainer(model, rows, feats, cfg, tmp_path / "run", prompts={"asr": ["Transcribe."]}, log=lambda m: None)
    history = trainer.train()
    assert all("ctc" in h for h in history)
    assert history[-1]["ctc"] < history[0]["ctc"]
    t2 = Trainer(SALMONN.from_config(tiny_cfg), rows, feats, cfg, tmp_path / "run", log=lambda m: None)
    assert t2.resume()
    for a, b in zip(trainer.ctc_head.parameters(), t2.ctc_head.parameters()):
        assert torch.equal(a, b)


def test_ctc_greedy_reads_back_the_spelled_transcript_within_a_vocabulary():
    from model.ctc import CTCHead
    from train.trainer import ctc_alignment_loss, ctc_greedy

    gen = torch.Generator().manual_seed(1)
    table = torch.randn(60, 16, generator=gen)
    head = CTCHead(16)
    blank = head.blank.detach()
    spelled = torch.stack([table[5], table[5], blank, table[9], table[9], table[41], blank, table[41]])
    # repeats merge, blanks split them: 5 9 41 41
    assert ctc_greedy(head, spelled, table) == [5, 9, 41, 41]
    vocab = torch.tensor([2, 5, 9, 41, 50])
    assert ctc_greedy(head, spelled, table, vocab) == [5, 9, 41, 41]      # ids come back as table rows
    # the loss over a vocabulary subset scores the same tokens, and still prefers the spelled ones
    good = ctc_alignment_loss(head, [spelled], [[5, 9, 41, 41]], table, vocab)
    bad = ctc_alignment_loss(head, [spelled], [[2, 50, 2]], table, vocab)
    assert torch.isfinite(good) and float(good) < 0.5 * float(bad)


def test_a_fresh_ctc_head_fitted_alone_finds_the_blank_the_audio_tokens_already_use():
    # a continued run whose earlier head is lost: the Q-Former's tokens already spell transcripts
    # with some blank direction; fitting the head alone must find it, so stage 2 starts aligned
    from model.ctc import CTCHead
    from train.trainer import ctc_greedy, fit_ctc_head

    gen = torch.Generator().manual_seed(2)
    table = torch.randn(50, 16, generator=gen)
    blank = torch.randn(16, generator=gen)
    targets, tokens = [], []
    for _ in range(24):
        words = torch.randint(0, 50, (4,), generator=gen).tolist()
        seq = [v for w in words for v in (table[w], table[w], blank)]
        targets.append(words)
        tokens.append(torch.stack(seq) + 0.05 * torch.randn(len(seq), 16, generator=gen))
    torch.manual_seed(3)
    head = CTCHead(16)
    assert not all(ctc_greedy(head, t, table) == w for t, w in zip(tokens, targets))   # a random blank
    before, after = fit_ctc_head(head, tokens, targets, table, steps=150, lr=0.05, batch_size=8)
    assert after < 0.3 * before
    cos = torch.nn.functional.cosine_similarity(head.blank.detach(), blank, dim=0)
    assert float(cos) > 0.6     # it only has to out-score the words, not match exactly
    assert all(ctc_greedy(head, t, table) == w for t, w in zip(tokens, targets))


def test_masked_features_keep_shape_and_change_with_the_generator():
    from train.trainer import mask_features

    x = torch.randn(120, 64).half()
    a = mask_features(x, 1.0, torch.Generator().manual_seed(0))
    b = mask_features(x, 1.0, torch.Generator().manual_seed(0))
    c = mask_features(x, 1.0, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x.float(), atol=1e-2)
    # masked frames are set to the clip's mean: at least one whole frame or channel band equals it
    mean = x.float().mean(0)
    assert ((a - mean).abs() < 0.5).all(dim=1).any() or ((a - mean).abs() < 0.5).all(dim=0).any()


def spelling_setup(tiny_cfg, tiny_data):
    """A fresh tiny model, its rows (the first six turned into ASR rows) and their cached features."""
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)
    for r in rows[:6]:
        r["task"] = "asr"
    return model, rows, encode_clips(model, [r["path"] for r in rows])


def test_ctc_only_warmup_trains_the_qformer_without_running_the_llm(tiny_cfg, tiny_data, tmp_path, monkeypatch):
    model, rows, feats = spelling_setup(tiny_cfg, tiny_data)
    monkeypatch.setattr(model, "answer_logprobs", lambda *a, **k: pytest.fail("the warm-up must not run the LLM"))
    lora_before = {k: v.clone() for k, v in model.trainable_parameters().items() if "lora_" in k}
    qf_before = model.window_qformer.query_tokens.detach().clone()
    cfg = TrainConfig(steps=30, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                      log_every=10, save_every=30, seed=0, ctc_weight=1.0, lm_weight=0.0, feature_masking=1.0)
    trainer = Trainer(model, rows, feats, cfg, tmp_path / "warm", log=lambda m: None)
    assert {r["task"] for r in trainer.rows} == {"asr"} and len(trainer.rows) == 6
    history = trainer.train()
    assert history[-1]["ctc"] < history[0]["ctc"]
    assert not torch.equal(model.window_qformer.query_tokens, qf_before)
    for k, v in model.trainable_parameters().items():
        if "lora_" in k:
            assert torch.equal(v, lora_before[k]), k           # the LLM side is untouched
    with pytest.raises(ValueError, match="ctc_weight"):
        Trainer(model, rows, feats, TrainConfig(lm_weight=0.0), tmp_path / "x", log=lambda m: None)


def test_anchor_term_keeps_the_sound_clips_audio_tokens_while_the_spelling_trains(tiny_cfg, tiny_data, tmp_path):
    from train.trainer import anchor_distance, reference_tokens

    def run(anchor_weight: float) -> tuple[float, list[dict]]:
        model, rows, feats = spelling_setup(tiny_cfg, tiny_data)
        sounds = [r["path"] for r in rows[6:]]          # never spelled: only the anchor reaches them
        reference = reference_tokens(model, feats, sounds)
        cfg = TrainConfig(steps=30, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                          log_every=10, save_every=30, seed=0, ctc_weight=1.0, lm_weight=0.0,
                          anchor_weight=anchor_weight, anchor_batch=2)
        trainer = Trainer(model, rows, feats, cfg, tmp_path / f"a{anchor_weight}", log=lambda m: None,
                          anchors=reference if anchor_weight else None)
        history = trainer.train()
        after = reference_tokens(model, feats, sounds)
        return float(anchor_distance([after[p] for p in sounds], [reference[p] for p in sounds])), history

    free, _ = run(0.0)
    kept, history = run(10.0)
    model, rows, feats = spelling_setup(tiny_cfg, tiny_data)
    with pytest.raises(ValueError, match="anchor clips"):   # a weight with nothing to hold to is refused
        Trainer(model, rows, feats, TrainConfig(steps=1, ctc_weight=1.0, lm_weight=0.0, anchor_weight=1.0),
                tmp_path / "n", log=lambda m: None).train()
    assert history[-1]["ctc"] < history[0]["ctc"]          # the spelling still trains
    assert "anchor" in history[-1]
    assert kept < free / 3, (kept, free)


def test_distill_term_holds_the_marked_rows_answers_near_the_reference_while_others_train(tiny_cfg, tiny_data,
                                                                                       tmp_path):
    import copy

    from train.trainer import answer_divergence

    prompts = {"audiocaption": ["Please describe the audio."]}

    def run(weight: float) -> tuple[float, float, float, list[dict]]:
        torch.manual_seed(0)
        model = SALMONN.from_config(tiny_cfg)
        rows = load_annotations(tiny_data)
        feats = encode_clips(model, [r["path"] for r in rows])
        taught = [dict(r, text="a long story about the sea and the rain") for r in rows[:4]]
        held = [dict(r, distill=True) for r in rows[4:]]
        reference = copy.deepcopy(model)
        cfg = TrainConfig(steps=30, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                          log_every=10, save_every=30, seed=0, distill_weight=weight)
        trainer = Trainer(model, taught + held, feats, cfg, tmp_path / f"d{weight}", prompts=prompts,
                          log=lambda m: None, reference=reference if weight else None)

        def measure() -> tuple[float, float]:
            model.eval()
            with torch.no_grad():
                tokens = model.clip_tokens([feats[r["path"]] for r in held])
                texts = [model.prompt.conversation(prompts["audiocaption"])] * len(held)
                targets = trainer.targets(held)
                drift = answer_divergence(model.answer_logprobs(tokens, texts, targets),
                                          reference.answer_logprobs(tokens, texts, targets))
                story = model.loss(model.clip_tokens([feats[r["path"]] for r in taught]),
                                   [model.prompt.conversation(prompts["audiocaption"])] * len(taught),
                                   trainer.targets(taught))
            return float(drift), float(story)

        _, story_before = measure()
        history = trainer.train()
        drift, story_after = measure()
        return drift, story_before, story_after, history

    with pytest.raises(ValueError, match="reference model"):
        model = SALMONN.from_config(tiny_cfg)
        Trainer(model, load_annotations(tiny_data), {}, TrainConfig(steps=1, distill_weight=1.0), tmp_path / "n",
                log=lambda m: None).train()
    free, before, after_free, _ = run(0.0)
    kept, _, after_kept, history = run(10.0)
    assert "distill" in history[-1]
    assert history[-1]["lm"] < history[-1]["loss"]          # the LM term is logged apart from the divergence
    assert after_kept < before * 0.9 and after_free < before * 0.9, (before, after_free, after_kept)   # the new answers train
    assert kept < free / 3, (kept, free)


def test_rows_with_ctc_text_get_the_ctc_loss_toward_that_text_not_their_answer(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)                  # audiocaption rows: no CTC by task
    for r in rows[:4]:
        r["ctc_text"] = "knock knock knock"
    feats = encode_clips(model, [r["path"] for r in rows])
    cfg = TrainConfig(steps=30, batch_size=4, init_lr=3e-3, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=3,
                      log_every=10, save_every=30, seed=0, ctc_weight=1.0, lm_weight=0.0)
    trainer = Trainer(model, rows, feats, cfg, tmp_path / "spell", log=lambda m: None)
    assert len(trainer.rows) == 4 and all(r["ctc_text"] for r in trainer.rows)
    knock = model.tokenizer("knock knock knock", add_special_tokens=False).input_ids
    assert trainer.ctc_targets(trainer.rows[:1]) == [knock]
    assert trainer.targets(trainer.rows[:1])[0][:-1] != knock         # the LM still learns the caption
    assert set(trainer.ctc_vocab.tolist()) == set(knock)
    history = trainer.train()
    assert history[-1]["ctc"] < history[0]["ctc"]


def test_spelled_sounds_scores_exact_spellings_and_event_counts(tiny_model):
    from types import SimpleNamespace

    from train.recipe import spelled_sounds
    from train.trainer import ctc_head_for

    head = ctc_head_for(tiny_model)
    emb = tiny_model.llama_model.get_input_embeddings().weight.detach().float()

    def spelling(text):   # audio tokens that spell `text` under the head: each token's embedding, then a blank
        ids = tiny_model.tokenizer(text, add_special_tokens=False).input_ids
        return torch.stack([v for i in ids for v in (emb[i], head.blank.detach().float())])

    knock3 = {"type": "sound", "sound": {"kind": "knock", "count": 3}}
    rain = {"type": "sound", "sound": {"kind": "rain"}}
    rows = [{"labels": knock3}, {"labels": knock3}, {"labels": rain}]
    tokens = [spelling("knock knock knock"), spelling("knock knock"), spelling("rain")]
    trainer = SimpleNamespace(ctc_head=head, ctc_vocab=None)
    assert spelled_sounds(tiny_model, trainer, rows, tokens) == {"exact": 2 / 3, "count": 0.5, "clips": 3}


def test_lora_only_stage_leaves_the_audio_side_untouched(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)
    feats = encode_clips(model, [r["path"] for r in rows])
    before = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    cfg = TrainConfig(steps=12, batch_size=4, init_lr=3e-3, min_lr=3e-3, warmup_steps=0, log_every=4,
                      save_every=12, seed=0, lora_only=True)
    trainer = Trainer(model, rows, feats, cfg, tmp_path / "act", prompts={"audiocaption": ["Describe."]}, log=lambda m: None)
    trainer.train()
    changed = {k for k, v in model.trainable_parameters().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)     # LoRA learned, nothing else moved
    # a later stage that trains everything takes the audio side back
    Trainer(model, rows, feats, TrainConfig(steps=1), tmp_path / "all", log=lambda m: None)
    assert all(p.requires_grad for p in model.trainable_parameters().values())


def test_example_mean_gives_a_short_answer_the_weight_of_a_long_one(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg).eval()
    rows = load_annotations(tiny_data)[:2]
    rows[0]["text"] = "a long story " * 12
    rows[1]["text"] = "short."
    feats = encode_clips(model, [r["path"] for r in rows])
    prompts = {t: ["Describe."] for t in {r["task"] for r in rows}}

    def lm(example_mean, batch):
        cfg = TrainConfig(example_mean=example_mean)
        with torch.no_grad():
            return float(Trainer(model, rows, feats, cfg, tmp_path, prompts, log=lambda m: None).loss_terms(batch)["lm"])

    long, short = lm(True, rows[:1]), lm(True, rows[1:])
    n_long, n_short = (len(t) for t in Trainer(model, rows, feats, TrainConfig(), tmp_path, log=print).targets(rows))
    assert n_long > 5 * n_short
    assert lm(True, rows) == pytest.approx((long + short) / 2, rel=1e-4)
    # the official token mean weighs each row by its length
    assert lm(False, rows) == pytest.approx((n_long * long + n_short * short) / (n_long + n_short), rel=1e-4)


def test_sound_word_weight_puts_the_loss_on_the_words_that_name_the_clips_sound(tiny_cfg, tiny_data, tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg).eval()
    rows = load_annotations(tiny_data)[:2]
    rows[0].update(text="We sat by the window while the rain fell on the roof.", sound_labels=["rain"])
    rows[1].update(text="A man walked home and the dogs barked at him.", sound_labels=[])
    feats = encode_clips(model, [r["path"] for r in rows])
    prompts = {t: ["Tell a story."] for t in {r["task"] for r in rows}}

    def trainer(weight, example_mean=False):
        return Trainer(model, rows, feats, TrainConfig(sound_word_weight=weight, example_mean=example_mean), tmp_path,
                       prompts, log=lambda m: None)

    tok, targets = model.tokenizer, trainer(1).targets(rows)
    weights = trainer(10).word_weights(rows, targets)
    marked = tok.decode([i for i, w in zip(targets[0], weights[0]) if w == 10]).strip()
    assert marked == "rain"                         # the sound's word (all its tokens), nothing else
    assert torch.all(weights[1] == 1)               # a row without sound labels keeps the plain loss
    assert trainer(1).word_weights(rows, targets) is None
    with torch.no_grad():
        model.eval()
        lps = [lp.detach() for lp in token_logprobs(model.answer_logprobs(
            model.clip_tokens([feats[r["path"]] for r in rows]),
            [model.prompt.conversation(prompts[r["task"]]) for r in rows], targets), targets)]
        for example_mean in (True, False):
            plain = float(trainer(1, example_mean).loss_terms(rows)["lm"])
            assert plain == pytest.approx(float(answer_nll(lps, example_mean)), rel=1e-4)
            weighted = float(trainer(10, example_mean).loss_terms(rows)["lm"])
            assert weighted == pytest.approx(float(answer_nll(lps, example_mean, weights)), rel=1e-4)
        # the token mean leans toward the sound word's loss: (plain sum + 9 x its sum) / (tokens + 9 x its tokens)
        rain = -lps[0][weights[0] == 10]
        n = sum(len(lp) for lp in lps)
        assert weighted == pytest.approx((plain * n + 9 * float(rain.sum())) / (n + 9 * len(rain)), rel=1e-4)
        assert weighted != pytest.approx(plain, rel=1e-3)


def test_stage3_rows_get_their_clips_sound_labels_for_the_weighted_words(tmp_path):
    from train.recipe import with_sound_labels

    clips = [{"path": "audio/a.wav", "labels": {"sound": {"kind": "dog_bark", "count": 2}}},
             {"path": "audio/b.wav", "labels": {"speech": {"text": "hi"}, "sound": {"kind": "rain"}}},
             {"path": "audio/c.wav", "labels": {"speech": {"text": "hello"}}}]
    (tmp_path / "clips.jsonl").write_text("\n".join(json.dumps(c) for c in clips))
    rows = [{"path": str((tmp_path / c["path"]).resolve()), "text": "story"} for c in clips]
    rows.append({"path": "/elsewhere/d.wav", "text": "story"})
    labelled = with_sound_labels(rows, tmp_path)
    # speech's keywords are every story's, so only the sound is weighted; an unknown clip has none
    assert [r["sound_labels"] for r in labelled] == [["dog"], ["rain"], [], []]
    assert "sound_labels" not in rows[0]              # the rows given are left as they were


def test_recipe_refuses_a_missing_extra_data_folder_before_loading_models(tmp_path):
    from train.recipe import main

    with pytest.raises(SystemExit, match="no stage2_instruct.json"):
        main(["--data", str(tmp_path), "--extra-data", str(tmp_path / "nowhere"), "--runs", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_init_from_weights_with_fewer_queries_repeats_them(tiny_cfg, tmp_path):
    import dataclasses

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.errors import CheckpointError
    from train.recipe import init_weights

    torch.manual_seed(0)
    one = SALMONN.from_config(tiny_cfg.replace(qformer=dataclasses.replace(tiny_cfg.qformer, num_query_tokens=1)))
    path = save_checkpoint(one, tmp_path / "one.safetensors")
    two = SALMONN.from_config(tiny_cfg.replace(qformer=dataclasses.replace(tiny_cfg.qformer, num_query_tokens=2)))
    with pytest.raises(CheckpointError, match="num_speech_query_token=1"):
        load_checkpoint(two, path)          # a plain load names the setting that would fit
    note = init_weights(two, str(path))
    assert "repeated 2x" in note
    q1, q2 = one.window_qformer.query_tokens, two.window_qformer.query_tokens
    assert q2.shape[1] == 2
    for k in range(2):
        assert torch.allclose(q2[:, k], q1[:, 0], atol=0.1) and not torch.equal(q2[:, k], q1[:, 0])
    p1, p2 = one.trainable_parameters(), two.trainable_parameters()
    for name in p1:
        if not name.endswith("query_tokens"):
            assert torch.equal(p1[name], p2[name]), name


def _lora_model(tiny_cfg, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0) -> SALMONN:
    import dataclasses

    from tests.conftest import randomize_lora

    torch.manual_seed(seed)
    model = SALMONN.from_config(tiny_cfg.replace(lora=dataclasses.replace(tiny_cfg.lora, rank=rank, alpha=alpha,
                                                                          target_modules=targets)))
    randomize_lora(model, seed)
    return model


def test_a_checkpoint_loads_with_the_lora_it_was_trained_with(tiny_cfg, tmp_path):
    """Rank, alpha and targets travel in the file: a model built from a config that says otherwise
    takes the checkpoint's LoRA, and a file without that entry keeps the config's."""
    from model.checkpoint import save_checkpoint, trainable_state_dict
    from safetensors.torch import save_file

    trained = _lora_model(tiny_cfg, 4, 8.0, ("q_proj", "k_proj", "v_proj", "gate_proj"))
    path = save_checkpoint(trained, tmp_path / "wide.safetensors", metadata={"stage": "test"})
    loaded = SALMONN.from_config(tiny_cfg.replace(ckpt=str(path)))
    assert (loaded.cfg.lora.rank, loaded.cfg.lora.alpha, loaded.cfg.lora.target_modules) == \
        (4, 8.0, ("q_proj", "k_proj", "v_proj", "gate_proj"))
    want, got = trainable_state_dict(trained), trainable_state_dict(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    plain = tmp_path / "plain.safetensors"            # as files saved before the LoRA entry existed
    save_file(trainable_state_dict(_lora_model(tiny_cfg, tiny_cfg.lora.rank, tiny_cfg.lora.alpha,
                                               tiny_cfg.lora.target_modules)), str(plain))
    assert SALMONN.from_config(tiny_cfg.replace(ckpt=str(plain))).cfg.lora == tiny_cfg.lora


def test_a_lora_stored_in_bfloat16_loads_as_its_rounded_weights(tiny_cfg, tmp_path):
    """--lora-dtype bfloat16: the file holds the LoRA in bfloat16 and the rest as trained; loading gives
    the model the rounded LoRA in its own dtype and the other weights exactly."""
    from safetensors import safe_open

    from model.checkpoint import save_checkpoint, trainable_state_dict

    trained = _lora_model(tiny_cfg, 4, 16.0, ("q_proj", "v_proj"))
    path = save_checkpoint(trained, tmp_path / "half.safetensors", lora_dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".lora_" in k} == {"BF16"}
    assert {d for k, d in dtypes.items() if ".lora_" not in k} == {"F32"}
    loaded = SALMONN.from_config(tiny_cfg.replace(ckpt=str(path)))
    want, got = trainable_state_dict(trained), trainable_state_dict(loaded)
    for k in want:
        expected = want[k].to(torch.bfloat16).float() if ".lora_" in k else want[k]
        assert got[k].dtype == torch.float32 and torch.equal(got[k], expected), k
    assert any(not torch.equal(got[k], want[k]) for k in want if ".lora_" in k)   # the rounding is real


def test_a_wider_lora_starts_as_the_narrower_one_it_grows_from(tiny_cfg, tmp_path):
    """--lora-rank / --lora-targets beyond --init's: the same answers at step 0, at each one's trained scale."""
    from model.checkpoint import save_checkpoint
    from train.recipe import init_weights

    narrow = _lora_model(tiny_cfg, 4, 8.0, ("q_proj", "v_proj"))                 # trained scale 2
    path = save_checkpoint(narrow, tmp_path / "narrow.safetensors")
    wide = _lora_model(tiny_cfg, 8, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), seed=1)   # scale 4
    assert "rank 4 -> 8" in init_weights(wide, str(path))
    audio = [narrow.encode_audio(0.1 * np.random.default_rng(2).standard_normal(16000).astype(np.float32)).embeds]
    texts, targets = [narrow.prompt.conversation(["Describe the audio."])], [[5, 9, 12, 7]]
    with torch.no_grad():
        want = narrow.answer_logprobs(audio, texts, targets, 2.0)[0]
        got = wide.answer_logprobs(audio, texts, targets, 4.0)[0]
        assert (want - got).abs().max() < 1e-4
        assert (want - narrow.answer_logprobs(audio, texts, targets, 0.0)[0]).abs().max() > 1e-2   # the LoRA matters
    with pytest.raises(SystemExit, match="may only grow"):
        init_weights(_lora_model(tiny_cfg, 2, 4.0, ("q_proj", "v_proj")), str(path))
    from model.checkpoint import trainable_state_dict
    from safetensors.torch import save_file

    unrecorded = tmp_path / "unrecorded.safetensors"    # no LoRA entry: rank and targets from its tensors
    save_file(trainable_state_dict(narrow), str(unrecorded))
    again = _lora_model(tiny_cfg, 8, 16.0, ("q_proj", "k_proj", "v_proj"), seed=3)           # the same scale 2
    assert "rank 4 -> 8, q_proj/v_proj -> q_proj/k_proj/v_proj" in init_weights(again, str(unrecorded))
    with torch.no_grad():
        assert (want - again.answer_logprobs(audio, texts, targets, 2.0)[0]).abs().max() < 1e-4


def test_recipe_refuses_lora_targets_the_llm_does_not_have(tmp_path):
    from train.recipe import main

    with pytest.raises(SystemExit, match="qproj not among"):
        main(["--data", str(tmp_path), "--lora-targets", "q_proj,qproj", "--runs", str(tmp_path / "r")])


def test_init_can_take_the_audio_side_from_a_spelling_stage(tiny_cfg, tmp_path):
    """--init-audio: the LoRA from one checkpoint, the Q-Former, projection and CTC head from another."""
    from model.checkpoint import save_checkpoint
    from train.recipe import init_weights

    torch.manual_seed(0)
    lora_side = SALMONN.from_config(tiny_cfg)
    torch.manual_seed(1)
    audio_side = SALMONN.from_config(tiny_cfg)
    for p in audio_side.trainable_parameters().values():   # LoRA B starts at zero: make every weight differ
        torch.nn.init.normal_(p)
    a = save_checkpoint(lora_side, tmp_path / "lora.safetensors")
    b = save_checkpoint(audio_side, tmp_path / "audio.safetensors")
    model = SALMONN.from_config(tiny_cfg)
    assert "from" in init_weights(model, str(a), audio_from=str(b))
    got, lora, audio = (m.trainable_parameters() for m in (model, lora_side, audio_side))
    for name, p in got.items():
        want = lora[name] if "lora_" in name else audio[name]
        assert torch.equal(p, want), name
    assert any("lora_" in n for n in got) and any("lora_" not in n for n in got)


def test_transcript_noise_feeds_swapped_words_to_transcripts_only_and_keeps_their_targets(tiny_cfg, tiny_data,
                                                                                           tmp_path):
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg)
    rows = load_annotations(tiny_data)
    said = ["the train to boston leaves at nine", "please call my sister at six",
            "a cup of tea in the garden", "the museum opens early on sundays"]
    rows = [dict(r, task="asr", text=t) for r, t in zip(rows[:4], said)] + rows[4:]
    feats = encode_clips(model, [r["path"] for r in rows])
    prompts = {"asr": ["Recognize the speech."], "audiocaption": ["Describe the audio."]}

    def trainer(noise: float) -> Trainer:
        cfg = TrainConfig(steps=1, batch_size=4, seed=3, transcript_noise=noise)
        return Trainer(model, rows, feats, cfg, tmp_path / str(noise), prompts, log=lambda m: None)

    noisy, plain = trainer(0.5), trainer(0.0)
    targets = noisy.targets(rows)
    model.train()
    assert plain.fed(rows, targets) is None
    fed = noisy.fed(rows, targets)
    swapped = 0
    for r, f, t in zip(rows, fed, targets):
        assert len(f) == len(t) and f[-1] == t[-1]           # the end of the answer is never swapped
        if r["task"] != "asr":
            assert f == t
            continue
        changed = [a for a, b in zip(f, t) if a != b]
        swapped += len(changed)
        assert set(changed) <= set(noisy.noise_vocab)         # swapped for words of the transcripts
    n_words = sum(len(t) - 1 for t in targets[:4])
    assert 0.2 * n_words < swapped < 0.8 * n_words, (swapped, n_words)
    assert noisy.targets(rows) == targets                    # what it learns to say is unchanged

    # the swapped words are what the LLM reads; the same tokens fed back read exactly as the targets
    model.eval()
    with torch.no_grad():
        tokens = model.clip_tokens([feats[r["path"]] for r in rows[:4]])
        texts = [model.prompt.conversation(prompts["asr"])] * 4
        same = model.answer_logprobs(tokens, texts, targets[:4])
        assert all(torch.equal(a, b) for a, b in zip(same, model.answer_logprobs(tokens, texts, targets[:4],
                                                                                  fed=targets[:4])))
        other = model.answer_logprobs(tokens, texts, targets[:4], fed=fed[:4])
        assert any(not torch.allclose(a, b) for a, b in zip(same, other))
        with pytest.raises(ValueError, match="lengths"):
            model.answer_logprobs(tokens, texts, targets[:4], fed=[t[:-1] for t in targets[:4]])
    assert noisy.fed(rows, targets) is None                  # evaluation reads the true transcript
    # a run with the noise draws the same batches as one without
    assert [r["text"] for r in noisy.batch()] == [r["text"] for r in plain.batch()]
    # a resumed run goes on with the swaps an uninterrupted one would draw
    noisy.save()
    again = trainer(0.5)
    assert again.resume() and again.noise_rng.getstate() == noisy.noise_rng.getstate()


def test_recipe_refuses_a_transcript_noise_outside_zero_to_one(tmp_path):
    from train.recipe import main

    with pytest.raises(SystemExit, match="transcript-noise"):
        main(["--data", str(tmp_path), "--stage2-transcript-noise", "1.5", "--runs", str(tmp_path / "r")])


def test_recipe_refuses_a_sound_word_weight_that_is_not_positive(tmp_path):
    from train.recipe import main

    for bad in ("0", "-2", "nan"):
        with pytest.raises(SystemExit, match="sound-word-weight"):
            main(["--data", str(tmp_path), "--sound-word-weight", bad, "--runs", str(tmp_path / "r")])
