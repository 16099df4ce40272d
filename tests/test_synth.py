"""Speech labels must match the audio; sentences, tasks and make_data must be valid and deterministic.

Sound events, music and mixing are tested in test_sounds.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train import make_data, synth, tasks

SR = synth.SR


# --------------------------------------------------------------------------- independent measurements

def f0_median(x):
    """Median pitch (Hz) of voiced 40 ms frames by autocorrelation, 60-400 Hz."""
    w = int(0.04 * SR)
    out = []
    for i in range(0, len(x) - w, w):
        fr = x[i: i + w] - x[i: i + w].mean()
        if np.sqrt(np.mean(fr ** 2)) < 0.05:
            continue
        ac = np.correlate(fr, fr, "full")[w - 1:]
        lo, hi = SR // 400, SR // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            out.append(SR / lag)
    return float(np.median(out))


# --------------------------------------------------------------------------- speech

def test_speech_is_16k_nonsilent_with_plausible_duration():
    text = "Please turn off the lights in the kitchen before you leave."
    x, lab = synth.speech(text, np.random.default_rng(0), voice="en-us+m1", rate=160, pitch=50)
    assert x.dtype == np.float32 and x.ndim == 1
    assert np.sqrt(np.mean(x ** 2)) > 0.02
    expected = len(text.split()) / 160 * 60  # words / (words per minute)
    assert 0.6 * expected < lab["duration"] < 2.0 * expected
    assert abs(lab["duration"] - len(x) / SR) < 1e-3
    assert lab["gender"] == "male" and lab["voice"] == "en-us+m1"


def test_female_voice_is_higher_than_male():
    text = "The meeting starts at half past nine."
    male, _ = synth.speech(text, np.random.default_rng(0), voice="en+m2", rate=150, pitch=50)
    female, lab = synth.speech(text, np.random.default_rng(0), voice="en+f2", rate=150, pitch=50)
    assert lab["gender"] == "female"
    assert f0_median(female) > 1.3 * f0_median(male)


def test_every_accent_honours_the_speaker_variant():
    """espeak-ng silently drops '+variant' for some voice names; then labels would lie."""
    for accent in synth.ACCENTS:
        a = synth.espeak("Good morning.", f"{accent}+m1", 160, 50)
        b = synth.espeak("Good morning.", f"{accent}+f1", 160, 50)
        assert len(a) != len(b) or not np.array_equal(a, b), accent


# --------------------------------------------------------------------------- sentences, questions, tasks

def test_sentences_are_diverse_and_split_by_content():
    rng = np.random.default_rng(0)
    many = [synth.sentence(rng) for _ in range(2000)]
    assert len(set(many)) > 1500
    held = [synth.sentence_for("eval", rng) for _ in range(50)]
    assert all(synth.sentence_split(s) == "eval" for s in held)
    assert not set(synth.voices("train")) & set(synth.voices("eval"))


def test_every_prompt_has_one_speech_placeholder_and_official_wording():
    for task, options in tasks.PROMPTS.items():
        for p in options:
            assert tasks.full_prompt(p).count("<SpeechHere>") == 1
    assert tasks.PROMPTS["asr"][0] == "Recognize the speech and give me the transcription."
    assert tasks.PROMPTS["audiocaption"][0] == "Please describe the audio."
    assert tasks.PROMPTS["music_description"][0] == "Listen to this music clip and describe the music."
    assert tasks.PROMPTS["co_reasoning"][0] == "Please answer the speaker's question in detail based on the background sound."


def test_coreasoning_count_answer_uses_label():
    bg = {"kind": "beeps", "count": 4, "pitch": "high", "freq_hz": 2500.0}
    q = {"category": "count", "target": "beeps", "text": "How many beeps did you hear?"}
    assert "four beeps" in tasks.coreason_answer(q, bg)
    assert "four" not in tasks.coreason_answer(q, {**bg, "count": 2})


def test_sound_spelling_gives_one_word_per_counted_event_and_nothing_for_speech_or_music():
    assert tasks.sound_spelling({"type": "sound", "sound": {"kind": "knock", "count": 3}}) == "knock knock knock"
    assert tasks.sound_spelling({"type": "sound", "sound": {"kind": "beeps", "count": 2, "pitch": "high"}}) == "high beep beep"
    assert tasks.sound_spelling({"type": "sound", "sound": {"kind": "sweep", "direction": "falling", "repeats": 2}}) \
        == "falling falling"
    assert tasks.sound_spelling({"type": "sound", "sound": {"kind": "rain"}}) == "rain"
    assert tasks.sound_spelling({"type": "speech_audio", "sound": {"kind": "rain"}, "speech": {}}) is None
    assert tasks.sound_spelling({"type": "music", "sound": {"kind": "music"}}) is None
    rng = np.random.default_rng(0)
    for kind in synth.SOUND_KINDS:   # every kind the generator makes has a spelling from its own labels
        _, lab = synth.sound(rng, kind)
        assert tasks.sound_spelling({"type": "sound", "sound": lab})


def test_every_question_the_generator_asks_has_a_kind_for_the_per_kind_report():
    rng = np.random.default_rng(0)
    labels = [synth.sound(rng, kind)[1] for kind in synth.SOUND_KINDS for _ in range(3)]
    labels += [synth.music(rng)[1] for _ in range(5)]
    asked = {q for lab in labels for s in range(20) for q, _ in tasks.qa_pairs(lab, np.random.default_rng(s))}
    assert all(tasks.question_kind(q) != "other" for q in asked)
    assert {tasks.question_kind(q) for q in asked} == set(tasks.QUESTIONS)
    assert tasks.question_kind("What is the meaning of life?") == "other"


def test_background_questions_ask_once_about_each_unasked_background_and_answer_from_its_labels():
    rain = {"type": "speech_audio", "sound": {"kind": "rain"}, "speech": {"text": "Hello there.", "gender": "male"}}
    music = {"type": "co_reasoning", "sound": {"kind": "music", "mode": "minor", "key": "D", "tempo": "fast", "bpm": 150,
                                              "timbre": "organ", "has_drums": True}}
    dog = {"type": "sound", "sound": {"kind": "dog_bark", "count": 3}}
    speech = {"type": "speech", "speech": {"text": "Hi.", "gender": "female"}}
    rows = [{"path": "a.wav", "task": "speech_audio", "labels": rain, "id": "a"},
            {"path": "a.wav", "task": "asr", "labels": rain, "id": "a"},
            {"path": "b.wav", "task": "co_reasoning", "labels": music, "id": "b"},
            {"path": "c.wav", "task": "QA", "labels": dog, "id": "c"},     # already asked about
            {"path": "c.wav", "task": "audiocaption", "labels": dog, "id": "c"},
            {"path": "d.wav", "task": "asr", "labels": speech, "id": "d"},  # no sound in it
            {"path": "e.wav", "task": "asr"}]                               # official row: no labels
    extra = tasks.background_questions(rows, seed=0)
    assert [r["path"] for r in extra] == ["a.wav", "b.wav"]
    for r in extra:
        snd = next(x["labels"]["sound"] for x in rows if x["path"] == r["path"])
        possible = {pair for s in range(200) for pair in tasks.qa_pairs(snd, np.random.default_rng(s))}
        assert r["task"] == "QA" and (r["Q"], r["text"]) in possible
        assert r["prompt"] == tasks.full_prompt(r["Q"]) and r["id"] == r["path"][0]
    assert tasks.background_questions(rows, seed=0) == extra       # the same seed, the same questions
    assert tasks.background_questions([rows[-1], rows[3], rows[4]]) == []


# --------------------------------------------------------------------------- make_data

def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_data_tiny_is_valid_and_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_data.main(["--out", str(a), "--seed", "0", "--scale", "0.01", "--workers", "2"])
    make_data.generate(b, seed=0, scale=0.01, workers=1)
    make_data.generate(c, seed=1, scale=0.01, workers=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb  # same seed -> identical bytes, whatever the worker count
    assert fa["stage2_instruct.json"] != fc["stage2_instruct.json"]

    seen_tasks, split_texts, split_voices = set(), {"train": set(), "eval": set()}, {"train": set(), "eval": set()}
    for name in ("stage1_pretrain.json", "stage2_instruct.json", "eval.json"):
        rows = json.loads((a / name).read_text())["annotation"]
        assert rows
        for r in rows:
            assert {"path", "text", "task", "Q", "prompt", "labels", "id"} <= r.keys()
            assert (a / r["path"]).is_file()
            assert r["prompt"].startswith(tasks.SPEECH_TAG) and r["prompt"].count("<SpeechHere>") == 1
            assert r["task"] in tasks.TASKS and r["text"].strip()
            if r["task"] == "QA":
                assert r["Q"] and r["prompt"] == tasks.SPEECH_TAG + r["Q"]
            if name == "stage1_pretrain.json":
                assert r["task"] in tasks.STAGE1_TASKS
            seen_tasks.add(r["task"])
            if "speech" in r["labels"]:
                split = "eval" if name == "eval.json" else "train"
                split_texts[split].add(r["labels"]["speech"]["text"])
                split_voices[split].add(r["labels"]["speech"]["voice"])
    assert seen_tasks == set(tasks.TASKS)
    assert not split_voices["train"] & split_voices["eval"]
    assert not split_texts["train"] & split_texts["eval"]  # sentences and question phrasings are held out

    clips = [json.loads(line) for line in (a / "clips.jsonl").read_text().splitlines()]
    assert {c["split"] for c in clips} == {"train", "eval"}
    for clip in clips:
        info = sf.info(str(a / clip["path"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.5 < info.duration <= 30.0 and abs(info.duration - clip["duration"]) < 0.01
        assert clip["description"].endswith((".", "?", '"'))
    from train.trainer import load_annotations   # the reader training and evaluation use

    rows = load_annotations(a / "eval.json")
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)


# --------------------------------------------------------------------------- open-vocabulary sentences

def test_sentence_cleaner_keeps_only_what_espeak_reads_as_written():
    from train.sentences import candidates, clean

    assert clean("1. The baker opened his shop early this morning.") == "The baker opened his shop early this morning."
    assert clean("Can you pass me the salt, please?") == "Can you pass me the salt, please?"
    for bad in ["The bus leaves at 10:30 every day.",      # digits: espeak says words the transcript lacks
                "I paid $5 for a coffee and a muffin.",    # symbols
                "Too short.",                               # under five words
                "The NASA team launched a rocket today.",  # acronyms are spelled out
                "the sentence starts with a small letter.",
                "A sentence with no end mark at all here"]:
        assert clean(bad) is None, bad
    got = candidates(" It is cold outside today, isn't it?\n- Wear a scarf. Take a warm coat with you too.\n"
                     "These sentences show how people talk.\n- A list item after the prose is not kept.")
    assert got == ["It is cold outside today, isn't it?", "Take a warm coat with you too."]


def test_open_sentences_join_the_data_split_by_content_and_never_the_everyday_eval(tmp_path):
    from train.evaluate import OPEN_EVAL_SENTENCES
    from train.sentences import normalized

    # The generator's ban list: the fixed out-of-domain evaluation sentences never reach training.
    assert len({normalized(s) for s in OPEN_EVAL_SENTENCES}) == len(OPEN_EVAL_SENTENCES)
    corpus = [f"Sentence number {w} talks about the weather today." for w in
              "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike oscar papa".split()]
    path = tmp_path / "sentences.json"
    path.write_text(json.dumps({"seed": 0, "sentences": corpus}))
    split = synth.load_sentences(path)
    assert split["eval"] and split["train"]  # 15 sentences: the hash puts some on each side
    assert sorted(split["train"] + split["eval"]) == sorted(corpus)
    assert all(synth.sentence_split(s) == "eval" for s in split["eval"])

    out = tmp_path / "d"
    meta = make_data.generate(out, seed=0, scale=0.02, workers=1, sentences=str(path), open_share=1.0)
    assert meta["sentences"]["open_clips"] > 0
    for name, side in (("stage2_instruct.json", "train"), ("eval.json", "eval")):
        for r in json.loads((out / name).read_text())["annotation"]:
            if r["task"] == "asr" and r["labels"]["type"] != "co_reasoning":  # not a spoken question: a corpus
                # sentence of its own split
                assert r["labels"]["speech"]["text"] in split[side]
    plain = make_data.generate(tmp_path / "p", seed=0, scale=0.02, workers=1)
    assert plain["sentences"] is None


def test_make_data_types_gives_a_speech_only_set_and_leaves_the_default_mix_alone(tmp_path):
    # A large speech-only set (for the cheap CTC alignment stage) must not shift the default mix.
    default = make_data.plan("train", 3000, 0)
    assert {t: sum(s["type"] == t for s in default) for t in make_data.CLIP_TYPES} == \
        {"speech": 900, "sound": 660, "music": 540, "speech_audio": 450, "co_reasoning": 450}
    mixed = make_data.plan("train", 100, 0, ["speech", "speech_audio"])
    assert len(mixed) == 100 and {s["type"] for s in mixed} == {"speech", "speech_audio"}
    assert sum(s["type"] == "speech" for s in mixed) == 67   # 0.30 : 0.15, renormalised

    meta = make_data.main(["--out", str(tmp_path / "s"), "--scale", "0.01", "--types", "speech", "--workers", "1"])
    assert meta["types"] == ["speech"] and set(meta["clip_types"]["train"]) == {"speech"}
    rows = json.loads((tmp_path / "s" / "stage1_pretrain.json").read_text())["annotation"]
    assert rows and {r["task"] for r in rows} == {"asr"}
    with pytest.raises(SystemExit):
        make_data.main(["--out", str(tmp_path / "x"), "--types", "speach"])


def test_more_voices_widen_only_the_training_voices(tmp_path):
    """`make_data --more-voices`: training speech comes from a larger pool of espeak-ng variants (each
    renders differently), while the held-out voices, and so the evaluation clips, stay exactly the same."""
    base, more = set(synth.voices("train")), set(synth.voices("train", more=True))
    assert base < more and not more & set(synth.voices("eval"))
    assert synth.voices("eval", more=True) == synth.voices("eval")
    extra = synth.EXTRA_MALE_VARIANTS + synth.EXTRA_FEMALE_VARIANTS
    assert not set(extra) & set(synth.MALE_VARIANTS + synth.FEMALE_VARIANTS + list(synth.HELDOUT_VARIANTS))
    assert synth.variant_gender("steph2") == "female" and synth.variant_gender("quincy") == "male"
    a = synth.espeak("Turn on the lights.", "en-us+quincy", 160, 50)
    b = synth.espeak("Turn on the lights.", "en-us+m1", 160, 50)
    assert len(a) and (len(a) != len(b) or not np.array_equal(a, b))

    plain, wide = tmp_path / "plain", tmp_path / "wide"
    make_data.main(["--out", str(plain), "--seed", "3", "--scale", "0.02", "--workers", "1", "--types", "speech"])
    make_data.main(["--out", str(wide), "--seed", "3", "--scale", "0.02", "--workers", "1", "--types", "speech",
                    "--more-voices"])
    assert (plain / "eval.json").read_bytes() == (wide / "eval.json").read_bytes()
    assert _files(plain / "audio" / "eval") == _files(wide / "audio" / "eval")
    voices = {r["labels"]["speech"]["voice"] for r in json.loads((wide / "stage1_pretrain.json").read_text())["annotation"]}
    assert voices <= more and any(v.split("+")[1] in extra for v in voices)
    assert json.loads((wide / "meta.json").read_text())["more_voices"] is True


def test_speed_perturbation_makes_new_training_voices_and_leaves_held_out_clips_alone(tmp_path):
    """`make_data --speed-perturb W`: training speech is played 1-W..1+W times as fast (tempo, pitch and
    formants together, as Kaldi's speed perturbation), its rate label follows, and held-out clips stay
    byte-identical."""
    rng = np.random.default_rng(0)
    x, plain = synth.speech("Turn on the lights in the kitchen.", rng, voice="en-us+m1", rate=160, pitch=50)
    y, fast = synth.speech("Turn on the lights in the kitchen.", rng, voice="en-us+m1", rate=160, pitch=50, speed=1.1)
    assert abs(len(x) / len(y) - 1.1) < 0.01
    assert fast["rate"] == 176 and fast["speed"] == 1.1 and "speed" not in plain

    ref, pert = tmp_path / "ref", tmp_path / "pert"
    make_data.main(["--out", str(ref), "--seed", "3", "--scale", "0.02", "--workers", "1", "--types", "speech"])
    make_data.main(["--out", str(pert), "--seed", "3", "--scale", "0.02", "--workers", "1", "--types", "speech",
                    "--speed-perturb", "0.1"])
    assert (ref / "eval.json").read_bytes() == (pert / "eval.json").read_bytes()
    assert _files(ref / "audio" / "eval") == _files(pert / "audio" / "eval")
    speech = [json.loads(line)["labels"]["speech"] for line in (pert / "clips.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    speeds = [s.get("speed", 1.0) for s in speech]
    assert all(0.9 <= v <= 1.1 and abs(v * 50 - round(v * 50)) < 1e-9 for v in speeds) and len(set(speeds)) > 3
    assert all(s["rate_label"] == synth.rate_label(s["rate"]) for s in speech)
    assert json.loads((pert / "meta.json").read_text())["speed_perturb"] == 0.1
    with pytest.raises(SystemExit):
        make_data.main(["--out", str(tmp_path / "bad"), "--speed-perturb", "0.5"])
