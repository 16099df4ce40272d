"""The evaluation rules (documented in train/evaluate.py) judge answers as intended."""
from train.evaluate import answer_correct, is_story, wer, words


def test_wer_normalises_case_punctuation_and_numbers():
    assert wer(["Turn on the lights, Nina."], ["turn on the lights nina"]) == 0.0
    assert wer(["It is 4 o'clock"], ["it is four o'clock"]) == 0.0
    assert wer(["a b c d"], ["a x c"]) == 0.5          # one substitution + one deletion over 4 words
    assert words("Twenty-one") == ["twenty", "one"]


def test_attribute_answers():
    assert answer_correct("Four.", "There are 4 beeps.")
    assert answer_correct("Square wave synthesizer.", "A square wave synthesizer is playing.")
    assert not answer_correct("Square wave synthesizer.", "A plucked string.")
    assert answer_correct("No.", "No, it is rain.")
    assert not answer_correct("No.", "Yes, it is not rain.")
    assert not answer_correct("Male.", "")
    # tempo estimates: within 4 % (MIREX Accuracy 1), and only the first number counts
    assert answer_correct("About 100.", "About 103 beats per minute.")
    assert not answer_correct("About 100.", "About 105.")
    assert not answer_correct("About 100.", "About 90, or maybe 100.")


def test_story_rule():
    caption = "A high-pitched tone beeps four times."
    story = ("Late at night the old lighthouse keeper heard a strange beeping from the radio. "
             "He counted four sharp tones, each higher than the wind outside. "
             "Remembering his training, he climbed the stairs and lit the great lamp. "
             "Far out at sea, a small boat saw the light and turned safely toward the harbor, "
             "and the keeper smiled as the beeping finally stopped.")
    assert is_story(story, [caption])
    assert not is_story(caption, [caption])
    assert not is_story(" ".join([caption] * 8), [caption])     # long, but only the caption repeated


def test_evaluation_command_reports_everyday_wer_for_a_checkpoint(tmp_path):
    """`python -m train.evaluate --ckpt ...` end to end on a tiny held-out set: the table and JSON carry the
    out-of-domain row, computed on the fixed everyday sentences (never trained on)."""
    import json

    from model.defaults import CHECKPOINTS
    from train import evaluate, make_data

    data = tmp_path / "data"
    make_data.generate(data, seed=0, scale=0.02, workers=1)
    rows = json.loads((data / "eval.json").read_text())["annotation"]
    clip = next(r for r in rows if r["labels"]["type"] == "sound")
    # a cached story reference, so the test does not wait for the LLM to write one
    (data / "eval_stories.json").write_text(json.dumps([{"path": str((data / clip["path"]).resolve()),
                                                         "text": "Once upon a time a bell rang.", "references": []}]))
    out = tmp_path / "eval"
    evaluate.main(["--data", str(data), "--out", str(out), "--scales", "0,4", "--asr", "2", "--open", "2", "--qa", "2",
                   "--gender", "1", "--story", "1", "--ppl", "1", "--ckpt", f"default={CHECKPOINTS['activation']}"])
    result = json.loads((out / "results.json").read_text())["checkpoints"]["default"]
    for scale in ("0", "4"):
        entry = result[scale]
        assert 0.0 <= entry["open_asr_wer"] and [e["ref"] for e in entry["open_asr_examples"]] == evaluate.OPEN_EVAL_SENTENCES[:2]
    assert "everyday WER" in (out / "results.md").read_text() and (out / "results.png").is_file()
    by_kind = result["4"]["attribute_by_kind"]
    assert sum(c["asked"] for c in by_kind.values()) == 2 and "other" not in by_kind
    assert "Attribute questions by kind, LoRA scale 4" in (out / "results.md").read_text()
    # at the largest scale only: greedy and beam search (default 4 beams) on all held-out ASR clips
    decoding = result["4"]["decoding"]
    assert "decoding" not in result["0"] and decoding["clips"] == sum(r["task"] == "asr" for r in rows)
    assert len(decoding["greedy"]["asr_examples"]) == min(3, decoding["clips"]) and decoding["beams"]["beams"] == 4
    assert 0.0 <= decoding["beams"]["asr_wer"] and 0.0 <= decoding["beams"]["open_asr_wer"]
    report = (out / "results.md").read_text()
    assert f"on {decoding['clips']} held-out ASR clips" in report and "| default | 4 beams |" in report


def test_batched_beam_search_answers_as_each_row_alone():
    """The evaluation's beam search runs left-padded batches; padding must not change any row's answer."""
    from model.defaults import CHECKPOINTS, bundled_config
    from model.salmonn import SALMONN
    from train import evaluate, synth

    model = SALMONN.from_config(bundled_config(CHECKPOINTS["activation"]))
    clips = evaluate.open_eval_clips(3)
    tokens = [model.encode_audio(wav[: len(wav) // k], output_attentions=False).embeds for k, (_, wav) in zip((1, 2, 3), clips)]
    assert len({t.shape[0] for t in tokens}) == 3          # three lengths: real padding in the batch
    prompts = ["Recognize the speech and give me the transcription."] * 3
    batched = evaluate.generate(model, tokens, prompts, 4.0, 12, beams=3)
    alone = [evaluate.generate(model, [t], [p], 4.0, 12, beams=3)[0] for t, p in zip(tokens, prompts)]
    assert batched == alone and all(batched)


def test_a_skipped_measure_reads_as_a_dash_not_a_score(tmp_path):
    """Parts of the evaluation left out (size 0) have no score: the table must not print 0 % WER for them."""
    from train import evaluate

    nan = float("nan")
    entry = {"asr_wer": nan, "attribute_accuracy": 0.5, "gender_accuracy": nan,
             "story_following_rate": nan, "grounded_story_rate": nan,
             "perplexity": {t: nan for t in ("asr", "audiocaption", "music_description", "QA", "speech_audio", "story")}}
    evaluate.write_report({"checkpoints": {"c": {"4": entry}}}, tmp_path, [4.0])
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| c | 4 |"))
    assert row == "| c | 4 | – | – | 50.0 % | – | – | – | – | – | – | – |"
    assert evaluate.mean([]) != evaluate.mean([])          # nan: skipped, not 0
