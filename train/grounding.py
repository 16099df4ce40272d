"""Is a story about the audio? A keyword rule per sound label.

A story is *grounded* when it names at least one of the clip's main sounds: one of that label's
keywords appears as a word (lower case, punctuation removed; a trailing "s" is ignored, so "beeps" and
"dogs" count). The keywords are the sound's everyday names, the verbs people use for it and its
obvious sources ("a dog barked", "the engine hummed"); deliberately not moods or settings
("stormy", "city"), which a story invents without hearing anything.

Labels are ``KEYWORDS`` keys. ``clip_labels`` turns ``train.make_data`` labels into them: a sound clip's
kind, "music" (plus "piano" for piano music), and for speech over a background both "speech" and the
background: either counts, since a story about what was said is grounded too.
"""
from __future__ import annotations

import re
from itertools import accumulate

from model.metrics import words

KEYWORDS: dict[str, set[str]] = {
    "rain": {"rain", "raining", "rained", "rainfall", "raindrop", "drizzle", "drizzling", "downpour", "shower"},
    "beep": {"beep", "beeping", "beeped", "bleep", "ping", "chime", "tone", "buzzer", "signal"},
    "siren": {"siren", "alarm", "wail", "wailing", "ambulance"},
    "alarm": {"alarm", "siren", "bell", "ringing", "buzzer", "wail", "wailing"},
    "sweep": {"whistle", "whistling", "tone", "siren", "sweep", "sweeping", "rising", "falling", "glide"},
    "music": {"music", "musical", "melody", "song", "tune", "chord", "note", "rhythm", "band",
              "orchestra", "instrument", "piano", "guitar", "organ", "synthesizer", "harmony", "beat", "drum"},
    "piano": {"piano", "pianist", "keys", "keyboard"},
    "speech": {"voice", "speak", "speaking", "spoke", "said", "say", "says", "saying", "talk", "talking",
               "word", "whisper", "whispered", "announce", "announced", "conversation", "speaker", "asked"},
    "knock": {"knock", "knocking", "knocked", "rap", "tap", "tapping", "door"},
    "clap": {"clap", "clapping", "clapped", "applause", "applaud", "applauded"},
    "dog": {"dog", "bark", "barking", "barked", "puppy", "woof", "hound"},
    "bird": {"bird", "chirp", "chirping", "tweet", "tweeting", "birdsong", "sparrow", "songbird", "warble"},
    "wind": {"wind", "windy", "breeze", "gust", "gusting", "howling", "howl"},
    "waves": {"wave", "ocean", "sea", "surf", "shore", "tide"},
    "crowd": {"crowd", "chatter", "murmur", "murmuring", "audience", "people"},
    "engine": {"engine", "motor", "rumble", "rumbling", "hum", "humming", "car", "truck", "machine"},
}
# make_data sound kinds -> KEYWORDS labels
KIND_LABEL = {"beeps": "beep", "dog_bark": "dog", "sweep": "sweep", "alarm": "alarm"}


def grounded(story: str, labels: list[str]) -> bool:
    """Whether `story` names one of `labels` (``KEYWORDS`` keys) by one of its keywords."""
    unknown = [lab for lab in labels if lab not in KEYWORDS]
    if unknown:
        raise ValueError(f"no keyword rule for {unknown}; known labels: {sorted(KEYWORDS)}")
    said = {w.removesuffix("'s") for w in words(story)}
    said |= {w[:-1] for w in said if w.endswith("s")}
    return any(said & KEYWORDS[lab] for lab in labels)


def naming_pieces(pieces: list[str], labels: list[str]) -> list[bool]:
    """For the pieces (e.g. decoded tokens) that make up a text, whether each is part of a word that
    names one of `labels` (``grounded``): a sound word split over several tokens marks all of them."""
    ends = list(accumulate(len(p) for p in pieces))
    marked = [False] * len(pieces)
    for m in re.finditer(r"[\w'-]+", "".join(pieces)):
        if grounded(m.group(), labels):
            for j, end in enumerate(ends):
                if end - len(pieces[j]) < m.end() and end > m.start():
                    marked[j] = True
    return marked


def clip_labels(labels: dict) -> list[str]:
    """The ``KEYWORDS`` labels of a clip from its make_data labels (empty: nothing to ground on)."""
    out = []
    sound = labels.get("sound") or {}
    if sound.get("kind") == "music":
        out.append("music")
        if "piano" in str(sound.get("timbre", "")):
            out.append("piano")
    elif sound.get("kind"):
        out.append(KIND_LABEL.get(sound["kind"], sound["kind"]))
    if labels.get("speech"):
        out.append("speech")
    return [lab for lab in out if lab in KEYWORDS]


def grounded_rate(stories: list[str], clips: list[dict]) -> float:
    """Share of `stories` grounded in their clips (make_data labels), over clips that have a label."""
    pairs = [(s, clip_labels(c)) for s, c in zip(stories, clips)]
    pairs = [(s, labs) for s, labs in pairs if labs]
    return sum(grounded(s, labs) for s, labs in pairs) / len(pairs) if pairs else float("nan")
