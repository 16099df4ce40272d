"""Turn clip labels (from train.synth) into (task, prompt, target) training examples.

Clip labels look like ``{"type": ..., "duration": s, "speech": {...}, "sound": {...},
"snr_db": x, "question": {...}}``; ``sound`` holds a sound-event dict or a music
dict (``kind == "music"``). Targets are fixed functions of the labels, so the
same clip always has the same answer; only the prompt wording varies.
"""

from __future__ import annotations

import numpy as np

SPEECH_TAG = "<Speech><SpeechHere></Speech> "

# The first phrasing of each task is the official SALMONN one; evaluation uses it.
PROMPTS = {
    "asr": ["Recognize the speech and give me the transcription.",
            "Transcribe the speech.",
            "Write down exactly what the speaker says.",
            "Listen to the speech and write down its content.",
            "What does the speaker say? Give me the transcript."],
    "audiocaption": ["Please describe the audio.",
                     "Please write down what you hear in the audio.",
                     "Describe the sound in one sentence.",
                     "What can you hear in this recording?",
                     "Give a short caption for this audio."],
    "music_description": ["Listen to this music clip and describe the music.",
                          "Describe this music.",
                          "What does this piece of music sound like?",
                          "Describe the key, tempo and instrument of this music.",
                          "Give a one-sentence description of the music."],
    "gender_recognition": ["Is the speaker male or female?",
                           "What is the gender of the speaker?",
                           "Is this a male or a female voice?",
                           "Tell me whether the speaker is male or female."],
    "speech_audio": ["Describe the speech and the background audio.",
                     "Describe the background audio and the speech in a fluent sentence.",
                     "Who is speaking, what do they say, and what can be heard behind them?",
                     "Describe both the speech and the background sound."],
    "co_reasoning": ["Please answer the speaker's question in detail based on the background sound.",
                     "Use your strong reasoning skills to answer the speaker's question in detail based on the background sound.",
                     "Listen to the question and answer it using the background sound.",
                     "Answer the question asked in the audio, based on what you hear in the background."],
}
TASKS = ["asr", "audiocaption", "music_description", "QA", "gender_recognition", "speech_audio", "co_reasoning"]
STAGE1_TASKS = {"asr", "audiocaption", "music_description"}

COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
TIMES = {1: "once", 2: "twice"}


def times(n: int) -> str:
    return TIMES.get(n, f"{COUNT_WORDS[n]} times")


def full_prompt(instruction: str) -> str:
    return SPEECH_TAG + instruction


def pick_prompt(task: str, rng: np.random.Generator, split: str) -> str:
    """Official wording for eval (stable benchmark); random wording for training (instruction diversity)."""
    options = PROMPTS[task]
    return full_prompt(options[0] if split == "eval" else str(rng.choice(options)))


# --------------------------------------------------------------------------- sound and music phrases

INSTRUMENT_PHRASE = {"sine": "a sine wave synthesizer", "square": "a square wave synthesizer",
                     "pluck": "plucked strings", "organ": "an organ", "bell": "bells"}
INSTRUMENT_SHORT = {"sine": "Sine wave synthesizer.", "square": "Square wave synthesizer.",
                    "pluck": "Plucked strings.", "organ": "Organ.", "bell": "Bells."}
ALARM_CLAUSE = {"two-tone": "an alarm sounds with two alternating tones", "pulsing": "an alarm beeps in rapid pulses",
                "continuous": "a continuous alarm buzzer sounds"}
ALARM_PHRASE = {"two-tone": "an alarm with two alternating tones", "pulsing": "an alarm beeping in rapid pulses",
                "continuous": "a continuous alarm buzzer"}


def sound_clause(s: dict) -> str:
    """Finite clause for a sound event: 'a dog barks twice'."""
    kind = s["kind"]
    if kind == "beeps":
        return f"a {s['pitch']}-pitched tone beeps {times(s['count'])}"
    if kind == "sweep":
        verb = "rises" if s["direction"] == "rising" else "falls"
        return f"a siren-like tone {verb} in pitch" + ("" if s["repeats"] == 1 else f" {times(s['repeats'])}")
    if kind == "alarm":
        return ALARM_CLAUSE[s["pattern"]]
    if kind == "music":
        return music_phrase(s) + " plays"
    return {
        "knock": lambda: f"someone knocks on a door {times(s['count'])}",
        "clap": lambda: f"someone claps {times(s['count'])}",
        "dog_bark": lambda: f"a dog barks {times(s['count'])}",
        "bird": lambda: "birds chirp and tweet",
        "rain": lambda: "rain falls steadily",
        "wind": lambda: "wind blows in gusts",
        "waves": lambda: "ocean waves wash onto the shore",
        "crowd": lambda: "a crowd of people murmurs",
        "engine": lambda: "an engine hums steadily",
    }[kind]()


def sound_phrase(s: dict) -> str:
    """Noun phrase for a sound: 'a dog barking twice' (fits 'with ... in the background')."""
    kind = s["kind"]
    if kind == "beeps":
        return f"a {s['pitch']}-pitched tone beeping {times(s['count'])}"
    if kind == "sweep":
        verb = "rising" if s["direction"] == "rising" else "falling"
        return f"a siren-like tone {verb} in pitch" + ("" if s["repeats"] == 1 else f" {times(s['repeats'])}")
    if kind == "alarm":
        return ALARM_PHRASE[s["pattern"]]
    if kind == "music":
        return music_phrase(s)
    return {
        "knock": lambda: f"someone knocking on a door {times(s['count'])}",
        "clap": lambda: f"someone clapping {times(s['count'])}",
        "dog_bark": lambda: f"a dog barking {times(s['count'])}",
        "bird": lambda: "birds chirping",
        "rain": lambda: "rain falling",
        "wind": lambda: "wind blowing",
        "waves": lambda: "ocean waves",
        "crowd": lambda: "the murmur of a crowd",
        "engine": lambda: "an engine running",
    }[kind]()


def music_phrase(m: dict) -> str:
    """'a fast tune in G minor played on an organ with drums'."""
    drums = " with drums" if m["has_drums"] else ""
    tempo = "medium-tempo" if m["tempo"] == "medium" else m["tempo"]
    return f"a {tempo} tune in {m['key']} {m['mode']} played on {INSTRUMENT_PHRASE[m['timbre']]}{drums}"


def caption(s: dict) -> str:
    """One-sentence audio caption of a sound event."""
    text = sound_clause(s)
    return text[0].upper() + text[1:] + "."


def music_description(m: dict) -> str:
    texture = {"melody": "melody", "chords": "chord progression", "melody and chords": "melody over chords"}[m["texture"]]
    tempo = "medium-tempo" if m["tempo"] == "medium" else m["tempo"]
    drums = "with a drum beat" if m["has_drums"] else "with no drums"
    return (f"A {tempo} {texture} in {m['key']} {m['mode']} played on {INSTRUMENT_PHRASE[m['timbre']]} "
            f"{drums}, at about {m['bpm']} beats per minute.")


# --------------------------------------------------------------------------- speech phrases

def _quote(text: str) -> str:
    """Quoted speech without a trailing full stop ('says "hello"'), keeping '?' and '!'."""
    return '"' + (text[:-1] if text.endswith(".") else text) + '"'


def speaker_says(sp: dict) -> str:
    who = "A woman" if sp["gender"] == "female" else "A man"
    verb = "asks" if sp["text"].endswith("?") else "says"
    return f"{who} {verb} {_quote(sp['text'])}"


def speech_audio_description(labels: dict) -> str:
    """'A woman says "..." with rain falling in the background.'"""
    return f"{speaker_says(labels['speech'])} with {sound_phrase(labels['sound'])} in the background."


def describe(labels: dict) -> str:
    """One natural sentence describing a whole clip (e.g. to prompt an LLM for a story)."""
    t = labels["type"]
    if t == "speech":
        sp = labels["speech"]
        pace = {"slow": " slowly", "fast": " quickly"}.get(sp["rate_label"], "")
        who = "A woman" if sp["gender"] == "female" else "A man"
        verb = "asks" if sp["text"].endswith("?") else "says"
        return f"{who} with a {sp['accent']} accent {verb}{pace} {_quote(sp['text'])}."
    if t == "sound":
        return caption(labels["sound"])
    if t == "music":
        return music_description(labels["sound"])
    return speech_audio_description(labels)


# --------------------------------------------------------------------------- QA (short answers)

SOUND_NAME = {"beeps": "Beeps.", "sweep": "A siren-like tone.", "knock": "Knocking.", "clap": "Clapping.",
              "dog_bark": "A dog barking.", "bird": "Birds chirping.", "alarm": "An alarm.", "rain": "Rain.",
              "wind": "Wind.", "waves": "Ocean waves.", "crowd": "A crowd.", "engine": "An engine."}
COUNT_Q = {"beeps": ["How many beeps are there?", "How many times does it beep?", "Count the beeps."],
           "knock": ["How many knocks are there?", "How many times does someone knock?", "Count the knocks."],
           "clap": ["How many claps are there?", "How many times does someone clap?", "Count the claps."],
           "dog_bark": ["How many times does the dog bark?", "How many barks are there?", "Count the barks."]}
IS_IT_Q = {"rain": "Is this the sound of rain?", "wind": "Is this the sound of wind?",
           "waves": "Is this the sound of ocean waves?", "crowd": "Is this the sound of a crowd?",
           "engine": "Is this the sound of an engine?", "dog_bark": "Is there a dog barking?",
           "bird": "Are there birds chirping?", "alarm": "Is there an alarm?", "beeps": "Is there beeping?",
           "knock": "Is someone knocking?", "clap": "Is someone clapping?"}


# Every short question, by what it asks (the evaluation reports accuracy per kind).
QUESTIONS = {
    "sound kind": ["What kind of sound is this?", "What sound do you hear?", "What is making this sound?"],
    "is it ...?": list(IS_IT_Q.values()),
    "count": [q for qs in COUNT_Q.values() for q in qs],
    "beep pitch": ["Is the beep low, medium or high in pitch?", "What is the pitch of the beeps: low, medium or high?"],
    "sweep direction": ["Is the pitch rising or falling?", "Is the tone rising or falling in pitch?"],
    "alarm pattern": ["Is the alarm two-tone, pulsing or continuous?"],
    "major/minor": ["Is the music in a major or minor key?", "Is this music major or minor?"],
    "key": ["What key is the music in?"],
    "tempo": ["Is the tempo slow, medium or fast?", "How fast is the music: slow, medium or fast?"],
    "BPM": ["About how many beats per minute is the music?"],
    "instrument": ["What instrument is playing?", "Which instrument plays the music?"],
    "drums": ["Are there drums in the music?", "Does the music have drums?"],
}
_KIND_OF = {q: kind for kind, qs in QUESTIONS.items() for q in qs}


def question_kind(question: str) -> str:
    """What a short question asks about (a key of QUESTIONS), or "other"."""
    return _KIND_OF.get(question.strip(), "other")


def yes_no(flag: bool) -> str:
    return "Yes." if flag else "No."


def sound_qa(s: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Candidate (question, short answer) pairs about a sound event."""
    kind = s["kind"]
    qa = [(str(rng.choice(QUESTIONS["sound kind"])),
           SOUND_NAME[kind])]
    if kind in COUNT_Q:
        qa += [(str(rng.choice(COUNT_Q[kind])), COUNT_WORDS[s["count"]].capitalize() + ".")] * 2
    if kind == "beeps":
        qa.append((str(rng.choice(QUESTIONS["beep pitch"])),
                   s["pitch"].capitalize() + "."))
    if kind == "sweep":
        qa += [(str(rng.choice(QUESTIONS["sweep direction"])),
                s["direction"].capitalize() + ".")] * 2
    if kind == "alarm":
        qa.append((QUESTIONS["alarm pattern"][0], s["pattern"].capitalize() + "."))
    # yes/no about a sound kind: half the time the true one, so "yes" is as common as "no"
    target = kind if rng.random() < 0.5 and kind in IS_IT_Q else str(rng.choice([k for k in IS_IT_Q if k != kind]))
    qa.append((IS_IT_Q[target], yes_no(target == kind)))
    return qa


def music_qa(m: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Candidate (question, short answer) pairs about a music clip."""
    return [
        (str(rng.choice(QUESTIONS["major/minor"])),
         m["mode"].capitalize() + "."),
        (QUESTIONS["key"][0], f"{m['key']} {m['mode']}."),
        (str(rng.choice(QUESTIONS["tempo"])),
         m["tempo"].capitalize() + "."),
        (QUESTIONS["BPM"][0], f"About {m['bpm']}."),
        (str(rng.choice(QUESTIONS["instrument"])),
         INSTRUMENT_SHORT[m["timbre"]]),
        (str(rng.choice(QUESTIONS["drums"])), yes_no(m["has_drums"])),
    ]


def qa_pairs(s: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    return music_qa(s, rng) if s["kind"] == "music" else sound_qa(s, rng)


# --------------------------------------------------------------------------- co-reasoning answers

LOCATION = {"rain": "outside in the rain", "wind": "outdoors on a windy day", "waves": "near the sea, maybe on a beach",
            "crowd": "in a busy place full of people, like a market or a station",
            "engine": "near a running engine, maybe in a car or next to a machine"}
TARGET_NAME = {"rain": "any rain", "wind": "any wind", "waves": "any waves", "crowd": "a crowd",
               "engine": "an engine"}
UNIT = {"beeps": ("beep", "beeps"), "knock": ("knock", "knocks"), "clap": ("clap", "claps"),
        "dog_bark": ("bark", "barks")}


def coreason_answer(q: dict, bg: dict) -> str:
    """Detailed answer to spoken question ``q`` (from synth.spoken_question) given background ``bg``."""
    cat, target, kind = q["category"], q["target"], bg["kind"]
    np_ = sound_phrase(bg)
    if cat == "identify":
        return f"The sound behind you is {np_}."
    if cat == "count":
        n = bg["count"]
        unit = UNIT[kind][0 if n == 1 else 1]
        return f"I can hear {np_} in the background, so there {'was' if n == 1 else 'were'} {COUNT_WORDS[n]} {unit}."
    if cat == "pitch":
        return f"The beeps are {bg['pitch']} in pitch, at around {round(bg['freq_hz'] / 10) * 10} hertz."
    if cat == "direction":
        if bg["direction"] == "rising":
            return "The tone is going up: it starts low and rises to a higher pitch."
        return "The tone is going down: it starts high and falls to a lower pitch."
    if cat == "location":
        return f"You are probably {LOCATION[kind]}, because I can hear {np_} around you."
    if cat == "yes_no":
        if target == kind:
            return f"Yes. I can hear {np_} around you."
        return f"No, I don't hear {TARGET_NAME[target]}. The sound around you is {np_}."
    if cat == "animals":
        if kind in ("dog_bark", "bird"):
            return f"Yes, I can hear {np_}, so there is an animal nearby."
        return f"No, I don't hear any animals. The sound behind you is {np_}."
    if cat == "alarm":
        if kind == "alarm":
            return f"Yes, that is {np_}, so you should check what set it off."
        return f"No, there is no alarm. The sound behind you is just {np_}."
    return _music_answer(cat, bg)


def _music_answer(cat: str, m: dict) -> str:
    inst = INSTRUMENT_PHRASE[m["timbre"]]
    if cat == "mood":
        feel = "happy and bright" if m["mode"] == "major" else "sad and gloomy"
        return f"The music sounds {feel}, because it is in a {m['mode']} key, {m['key']} {m['mode']}."
    if cat == "instrument":
        return f"The music behind you is played on {inst}."
    if cat == "tempo":
        tempo = "has a medium tempo" if m["tempo"] == "medium" else f"is {m['tempo']}"
        return f"The music {tempo}, at about {m['bpm']} beats per minute."
    if cat == "drums":
        if m["has_drums"]:
            return f"Yes, there is a drum beat with kick, snare and hi-hat under the {inst.split()[-1]}."
        return f"No, there are no drums; only {inst} can be heard."
    if cat == "dance":
        if m["tempo"] != "slow" and m["has_drums"]:
            return (f"Yes, it has a {m['tempo']} tempo of about {m['bpm']} beats per minute and a steady drum beat, "
                    "so it is good for dancing.")
        if m["tempo"] == "slow":
            return f"Probably not: the music is slow, at about {m['bpm']} beats per minute, so it suits relaxing more than dancing."
        return f"Maybe: the tempo is {m['tempo']}, about {m['bpm']} beats per minute, but there are no drums to dance to."
    raise ValueError(f"unknown question category {cat!r}")


# --------------------------------------------------------------------------- examples

def _example(task: str, prompt: str, text: str, q: str = "") -> dict:
    return {"task": task, "prompt": prompt, "Q": q, "text": text}


def _qa_example(pairs: list[tuple[str, str]], rng: np.random.Generator) -> dict:
    question, answer = pairs[int(rng.integers(len(pairs)))]
    return _example("QA", full_prompt(question), answer, question)


def sound_spelling(labels: dict) -> str | None:
    """What a sound clip's audio tokens should spell under the auxiliary CTC loss, as a transcript
    does for speech: one word per counted event ("high beep beep beep", "knock knock"), per sweep
    ("rising rising"), else the sound's name. None for clips with speech or music in them.

    Why: the LLM reads audio tokens most easily when they look like its own word embeddings; the CTC
    loss makes each knock or beep a token of its own, so counting them is counting words."""
    if labels.get("type") != "sound":
        return None
    s = labels["sound"]
    kind = s["kind"]
    if kind in UNIT:
        events = " ".join([UNIT[kind][0]] * s["count"])
        return f"{s['pitch']} {events}" if kind == "beeps" else events
    if kind == "sweep":
        return " ".join([s["direction"]] * s["repeats"])
    if kind == "alarm":
        return f"{s['pattern']} alarm"
    return {"bird": "birds"}.get(kind, kind)


def background_questions(rows: list[dict], seed: int = 0) -> list[dict]:
    """One extra QA row for each clip in `rows` that has a sound or music in it (a background under
    speech, the sound a spoken question is about) but no question about that sound among `rows`.

    Why: ``examples_for`` asks about only 30 % of speech-over-background clips (and never about a
    co-reasoning clip's sound), while the held-out set asks about every one; without them the model
    answers a question about the background with the transcript. Rows need make_data's ``labels``;
    rows without them (official annotation files) add nothing.
    """
    rng = np.random.default_rng(seed)
    asked = {r["path"] for r in rows if r["task"] == "QA"}
    out, seen = [], set()
    for r in rows:
        snd = (r.get("labels") or {}).get("sound")
        if not snd or r["path"] in asked or r["path"] in seen:
            continue
        seen.add(r["path"])
        ex = _qa_example(qa_pairs(snd, rng), rng)
        out.append({**{k: r[k] for k in ("path", "labels", "id") if k in r}, **ex})
    return out


def examples_for(labels: dict, rng: np.random.Generator, split: str = "train") -> list[dict]:
    """Examples for one clip: ``[{"task", "prompt", "Q", "text"}, ...]``.

    Training clips get a random subset of their applicable tasks (keeps the mix
    balanced); eval clips get every applicable task once, with official prompts.
    """
    t, full = labels["type"], split == "eval"

    def maybe(p: float) -> bool:
        return full or rng.random() < p

    def ex(task: str, text: str) -> dict:
        return _example(task, pick_prompt(task, rng, split), text)

    out = []
    sp, snd = labels.get("speech"), labels.get("sound")
    if t == "speech":
        out.append(ex("asr", sp["text"]))
        if maybe(0.5):
            out.append(ex("gender_recognition", sp["gender"].capitalize() + "."))
    elif t == "sound":
        out.append(ex("audiocaption", caption(snd)))
        out.append(_qa_example(qa_pairs(snd, rng), rng))
    elif t == "music":
        out.append(ex("music_description", music_description(snd)))
        out += [_qa_example(qa_pairs(snd, rng), rng) for _ in range(1 if full else 2)]
    elif t == "speech_audio":
        out.append(ex("speech_audio", speech_audio_description(labels)))
        if maybe(0.5):
            out.append(ex("asr", sp["text"]))
        if maybe(0.3):
            out.append(ex("gender_recognition", sp["gender"].capitalize() + "."))
        if maybe(0.3):
            out.append(_qa_example(qa_pairs(snd, rng), rng))
    elif t == "co_reasoning":
        out.append(ex("co_reasoning", coreason_answer(labels["question"], snd)))
        if maybe(0.4):
            out.append(ex("asr", sp["text"]))
        if maybe(0.3):
            out.append(ex("speech_audio", speech_audio_description(labels)))
    else:
        raise ValueError(f"unknown clip type {t!r}")
    return out
