"""Hearing everyday speech: the open-vocabulary sentence pool, the TTS engines with one held out for
testing, the grounded-story rule, and the bundled speech examples transcribed word for word."""
from __future__ import annotations

import json
import shutil

import pytest

from train import engines, hearing_data
from train.grounding import clip_labels, grounded, grounded_rate, naming_pieces
from train.sentences import pool_sentence, sentence_pool

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")


def test_pool_keeps_clean_everyday_sentences_only():
    assert pool_sentence("Kites rise against the wind, not with it.") == "Kites rise against the wind, not with it."
    assert pool_sentence("I think I'll stay home tonight.")                  # "I" is not a name
    assert pool_sentence("Too short.") is None                               # under 4 words
    assert pool_sentence("There were 42 ways to leave.") is None             # digits
    assert pool_sentence("Then John told Mary about Boston.") is None        # names-heavy
    assert pool_sentence("He said: go away now.") is None                    # other punctuation
    assert pool_sentence(" ".join(["word"] * 17) + ".") is None              # over 16 words
    entries = ["It was late.  The cat sat\non the warm mat all day. It was late.",
               "The doctor said I need to drink more water and sleep longer.",   # an evaluation sentence
               "Ask Mr. Smith where the keys went tonight."]                      # abbreviation splits badly
    assert sentence_pool(entries) == ["The cat sat on the warm mat all day."]


def test_wordnet_usage_examples_become_pool_sentences(tmp_path):
    from train.sentences import wordnet_entries

    (tmp_path / "data.noun").write_text(
        '  1 This software and database is provided "AS IS" by Princeton.  \n'
        '02084071 05 n 01 dog 0 | a domesticated canid; "the dog barked all night"; "Dogs ran"  \n')
    (tmp_path / "data.verb").write_text('00001740 29 v 01 breathe 0 | draw air; "She breathed deeply before the dive!"\n')
    (tmp_path / "data.adj").write_text("00001740 00 a 01 able 0 | having the means; no example\n")
    (tmp_path / "data.adv").write_text("")
    entries = wordnet_entries(tmp_path)
    assert entries == ["The dog barked all night.", "Dogs ran.", "She breathed deeply before the dive!"]
    assert sentence_pool(entries) == ["She breathed deeply before the dive!", "The dog barked all night."]


def test_grounding_rule_on_hand_made_answers():
    rain_story = "Mia listened as the rain drummed on the roof and her old phone beeped twice."
    assert grounded(rain_story, ["rain"]) and grounded(rain_story, ["beep"])
    assert not grounded("A bustling market in Mexico City was full of colour and life.", ["rain", "beep"])
    assert grounded("The dogs barked at the mailman.", ["dog"])                    # plural and verb forms
    assert grounded("She played a soft melody on the piano.", ["music"])
    assert grounded("Sirens wailed through the night.", ["siren"])
    assert not grounded("The night was stormy and dark.", ["rain"])                # a mood, not the sound
    with pytest.raises(ValueError, match="no keyword rule"):
        grounded("anything", ["theremin"])
    assert clip_labels({"type": "sound", "sound": {"kind": "dog_bark", "count": 3}}) == ["dog"]
    assert clip_labels({"type": "speech_audio", "speech": {"text": "hi"}, "sound": {"kind": "music"}}) == ["music", "speech"]
    clips = [{"sound": {"kind": "rain"}}, {"sound": {"kind": "knock"}}, {}]
    assert grounded_rate([rain_story, "The wind howled.", "no label here"], clips) == 0.5
    # the pieces of a text (tokens) that make up a word naming the sound, however the word is split
    pieces = ["Mia", " heard", " the", " rain", "dro", "ps", " on", " the", " roof", "."]
    assert naming_pieces(pieces, ["rain"]) == [False, False, False, True, True, True, False, False, False, False]
    assert not any(naming_pieces(pieces, ["dog"]))


def test_activation_stories_that_ignore_the_sound_are_rewritten_or_dropped(monkeypatch):
    """Stage 3 learns only stories that name the clip's main sound: an answer that does not is
    written again, and dropped if it never does; with the option off every answer is kept as written."""
    from train import stories

    class Tok:
        def apply_chat_template(self, messages, **kw):
            return messages[0]["content"]

    class Model:
        tokenizer = Tok()

    def clip(i, kind):
        return {"path": f"/c{i}.wav", "split": "train", "type": "sound", "id": f"c{i}",
                "description": f"clip {i}", "labels": {"sound": {"kind": kind}}}

    clips = [clip(0, "rain"), clip(1, "dog_bark"), clip(2, "knock")]
    calls = []

    def writer(model, texts, *a, **kw):     # rain: grounded at once; dog: on the second try; knock: never
        calls.append(len(texts))
        return ["Rain fell all night." if "clip 0" in t else
                ("A dog barked twice." if "clip 1" in t and len(calls) > 1 else "The city slept.") for t in texts]

    monkeypatch.setattr(stories, "base_llm_write", writer)
    rows = stories.write_activation_data(Model(), clips, 3, 0, seed=0, grounded_only=True, tries=3)
    assert sorted(r["text"] for r in rows) == ["A dog barked twice.", "Rain fell all night."]
    assert calls == [3, 2, 1]
    calls.clear()
    assert len(stories.write_activation_data(Model(), clips, 3, 0, seed=0)) == 3 and calls == [3]
    # named, but not within the opening words: written again, then dropped
    calls.clear()
    rows = stories.write_activation_data(Model(), clips, 3, 0, seed=0, grounded_only=True, tries=3, within=1)
    assert [r["text"] for r in rows] == ["Rain fell all night."] and calls == [3, 2, 2]


def test_engines_refuse_a_missing_engine_clearly(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(engines.EngineMissing, match="apt-get install -y flite"):
        engines.flite("Hello there.", "slt")
    with pytest.raises(engines.EngineMissing, match="festival"):
        hearing_data.parse_engines(["festival"])
    with pytest.raises(ValueError, match="unknown TTS engine"):
        engines.require("sam")


def test_held_out_engine_is_refused_for_training():
    with pytest.raises(ValueError, match="held-out engine"):
        hearing_data.parse_engines(["espeak", engines.HELD_OUT])
    with pytest.raises(SystemExit, match="held-out engine"):
        hearing_data.main(["--out", "unused", "--clips", "1", "--engines", "flite"])


@needs_espeak
def test_training_manifest_never_holds_the_held_out_engine(tmp_path):
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"sentences": [f"The {w} cat sat on the warm mat." for w in
                                              ("old", "young", "grey", "black", "small", "big")]}))
    train_engines = ["espeak"] + (["festival"] if shutil.which("text2wave") else [])
    meta = hearing_data.generate(tmp_path / "d", 6, train_engines, str(pool), noise_share=0.5)
    rows = json.loads((tmp_path / "d" / "stage2_instruct.json").read_text())["annotation"]
    assert len(rows) == 6 == meta["clips"] and all((tmp_path / "d" / r["path"]).is_file() for r in rows)
    used = {r["labels"]["speech"]["engine"] for r in rows}
    assert used <= set(train_engines) and engines.HELD_OUT not in used
    assert engines.HELD_OUT not in (tmp_path / "d" / "stage1_pretrain.json").read_text()
    assert all(r["task"] == "asr" and r["text"] == r["labels"]["speech"]["text"] for r in rows)


@needs_flite
def test_everyday_eval_set_is_held_out_engine_and_sentences(tmp_path):
    from train import synth

    pool = tmp_path / "pool.json"
    sentences = [f"My {w} neighbour paints the fence every spring." for w in ("old", "kind", "new", "quiet", "tall",
                                                                             "busy", "shy", "loud", "happy", "sad")]
    pool.write_text(json.dumps({"sentences": sentences}))
    meta = hearing_data.everyday_eval(tmp_path / "e", str(pool), n_pool=3)
    rows = json.loads((tmp_path / "e" / "eval.json").read_text())["annotation"]
    held = {s for s in sentences if synth.sentence_split(s) == "eval"}
    assert len(rows) == meta["clips"] == 30 + min(3, len(held))
    assert {r["labels"]["speech"]["engine"] for r in rows} == {engines.HELD_OUT}
    assert len(meta["by_voice"]) >= 3
    assert all(r["text"] in held for r in rows[30:])            # pool sentences only from the held-out side
    again = json.loads((tmp_path / "e" / "eval.json").read_text())["annotation"]
    assert [r["text"] for r in again] == [r["text"] for r in rows]


@needs_espeak
def test_everyday_dev_set_never_speaks_the_evaluation_or_uses_the_held_out_engine(tmp_path):
    """Decoding settings are chosen on this set: other held-out sentences, training engines' voices only."""
    from train import synth

    pool = tmp_path / "pool.json"
    sentences = [f"The {w} {n} waits by the station every morning." for w in ("old", "kind", "new", "quiet", "tall", "busy")
                 for n in ("dog", "man", "bus", "cat", "girl")]
    pool.write_text(json.dumps({"sentences": sentences}))
    held = {s for s in sentences if synth.sentence_split(s) == "eval"}
    evaluation = set(hearing_data.everyday_sentences(str(pool), 2))
    meta = hearing_data.everyday_dev(tmp_path / "d", str(pool), clips=50, n_pool=2)
    rows = json.loads((tmp_path / "d" / "eval.json").read_text())["annotation"]
    texts = [r["text"] for r in rows]
    assert len(rows) == meta["clips"] == len(held - evaluation) > 0
    assert set(texts) <= held and not set(texts) & evaluation
    assert {r["labels"]["speech"]["engine"] for r in rows} <= set(engines.TRAIN_ENGINES)
    assert all((tmp_path / "d" / r["path"]).is_file() for r in rows)


@pytest.mark.xfail(strict=True, reason="SALMONN-tiny does not yet hear everyday speech word for word: the flagship "
                   "speech.wav comes back as 'The quarter round fox, so the laser dog near the river bank.' with "
                   "the speech-recognition preset (dictation.wav is right)")
def test_bundled_speech_examples_are_transcribed_word_for_word():
    from app.presets import EXAMPLES, OFFENSIVE_WORDS, PRESETS_BY_KEY
    from model.config import GenerateConfig
    from model.defaults import default_config
    from model.metrics import words
    from model.pipeline import Pipeline

    pipe = Pipeline.from_config(default_config("activation"))
    preset = PRESETS_BY_KEY["asr"]
    scale, beams, ctc = preset.suggested(pipe.trained_scale)
    decoding = GenerateConfig(max_new_tokens=48, num_beams=beams, repetition_penalty=1.1, ctc_weight=ctc,
                              bad_words=OFFENSIVE_WORDS)       # as the studio decodes by default
    wrong = []
    for example in (e for e in EXAMPLES if e.preset == "asr"):
        heard = pipe.answer(example.path, preset.prompt, generate=decoding, lora_scale=scale).text
        if words(heard) != words(example.transcript):
            wrong.append((example.file, heard))
    assert not wrong, wrong
