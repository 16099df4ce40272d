"""Task presets (the paper's three task levels), the bundled example clips, and the reference
answers the scale lab scores. Plain data: the UI only reads it.

Prompt wording: `source="official"` means the exact instruction from the official SALMONN demo /
test prompts (paper.md §5 item 5); "ours" means we wrote it because no official wording is known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.defaults import CTC_WEIGHT

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

LEVELS = {
    1: "Level 1 · trained task",
    2: "Level 2 · untrained speech-NLP task",
    3: "Level 3 · untrained speech + audio task",
}

# What the LoRA scale tends to do per level (our summary of paper §4c/§5, not measured numbers).
SCALE_NOTES = {
    1: "Trained task: the full trained LoRA scale is the natural setting. Lowering it usually makes "
       "this task worse (e.g. more transcription errors).",
    2: "Emergent ability: an instruction-tuned model may ignore the instruction at the full scale "
       "(task over-fitting). Try about half the trained scale; an activation-tuned model should "
       "follow it at the full scale.",
    3: "Emergent ability that needs both speech and sound: the most affected by task over-fitting. "
       "On an instruction-tuned model try about half the trained scale.",
}

# What "Block offensive words" keeps out of answers (decoding's bad_words: the model writes its next-best
# word instead). Small models mishear speech as profanity that was never said; only strong words here, so
# no everyday word is blocked.
OFFENSIVE_WORDS = ("fuck", "fucks", "fucked", "fucking", "fucker", "motherfucker", "shit", "shits", "shitty",
                   "bullshit", "cunt", "cunts", "asshole", "assholes", "bitch", "bitches", "whore", "whores",
                   "slut", "sluts", "wanker", "twat", "nigger", "niggers", "faggot", "faggots")


@dataclass(frozen=True)
class Preset:
    key: str
    level: int
    title: str
    prompt: str
    example: str                 # file name in assets/examples/ that suits it
    source: str = "ours"         # "official" | "ours"
    scale_factor: float = 1.0    # suggested LoRA scale as a fraction of the trained scale
    # Suggested beams: tasks with one right answer (a transcript) gain from beam search, as the official
    # SALMONN decodes (4 beams); open-ended answers stream greedily.
    beams: int = 1
    # Suggested CTC guidance where the checkpoint has a CTC head: only where the answer is the words
    # spoken, which is what the head spells (SALMONN-tiny; see model/ctc.py).
    ctc_weight: float = 0.0

    @property
    def label(self) -> str:
        return f"L{self.level} · {self.title}"

    @property
    def note(self) -> str:
        wording = "official SALMONN wording" if self.source == "official" else "our wording (no official prompt known)"
        decoding = (f" Suggested decoding: {self.beams} beams (one right answer; beam search finds it more "
                    "often than greedy decoding; its words appear once the beams agree on them)." if self.beams > 1 else "")
        if self.ctc_weight:
            decoding += (f" With a CTC head (SALMONN-tiny): CTC guidance {self.ctc_weight:g}, which keeps the "
                         "transcript to words the audio tokens spell.")
        return f"**{LEVELS[self.level]}** ({wording}). {SCALE_NOTES[self.level]}{decoding}"

    def suggested(self, trained: float) -> tuple[float, int, float]:
        """(LoRA scale, beams, CTC weight) the preset suggests for a model trained at scale `trained`."""
        return round(trained * self.scale_factor, 1), self.beams, self.ctc_weight


PRESETS: list[Preset] = [
    # Level 1: trained during instruction tuning.
    Preset("asr", 1, "Speech recognition", "Recognize the speech and give me the transcription.",
           "speech.wav", "official", beams=4, ctc_weight=CTC_WEIGHT),
    Preset("en2zh", 1, "Translation En→Zh", "Listen to the speech and translate it into Chinese.",
           "speech.wav", "official"),
    Preset("aac", 1, "Audio captioning", "Please describe the audio.", "rain_beeps.wav", "official"),
    Preset("phones", 1, "Phone recognition", "Recognize the phonemes in the speech and write them out.",
           "speech.wav", beams=4),
    Preset("emotion", 1, "Emotion recognition", "Describe the emotion of the speaker in one word.",
           "speech.wav", "official"),
    Preset("music", 1, "Music captioning", "Listen to this music clip and describe the music.",
           "melody.wav", "official"),
    Preset("overlap", 1, "Overlapped-speech recognition",
           "Two people are speaking at the same time. Recognize the speech of each speaker.", "overlap.wav",
           beams=4),
    Preset("speaker", 1, "Speaker verification",
           "Are the first and the second utterance spoken by the same speaker? Answer yes or no.",
           "two_speakers.wav"),
    Preset("gender", 1, "Gender recognition", "What is the gender of the speaker? Answer in one word.",
           "speech.wav"),
    # Level 2: speech-based NLP tasks never trained on.
    Preset("en2de", 2, "Translation En→De", "Listen to the speech and translate it into German.",
           "speech.wav", "official", 0.5),
    Preset("en2ja", 2, "Translation En→Ja", "Listen to the speech and translate it into Japanese.",
           "speech.wav", "official", 0.5),
    Preset("keywords", 2, "Keyword extraction", "Give me only three keywords of the text.", "speech.wav",
           "official", 0.5),
    Preset("sqqa", 2, "Spoken-query QA", "Please answer the question in detail.", "question.wav",
           "official", 0.5),
    Preset("slots", 2, "Slot filling",
           "Listen to the request. Give its intent and every slot in it as slot = value.", "request.wav",
           scale_factor=0.5),
    # Level 3: need both the speech and the non-speech sounds.
    Preset("story", 3, "Audio storytelling",
           "Based on the audio, write a story in detail. Your story should be highly related to the audio.",
           "rain_beeps.wav", "official", 0.5),
    Preset("sac", 3, "Speech-audio co-reasoning",
           "Use your strong reasoning skills to answer the speaker's question in detail based on the "
           "background sound.", "speech_rain.wav", "official", 0.5),
]
PRESETS_BY_LABEL = {p.label: p for p in PRESETS}
PRESETS_BY_KEY = {p.key: p for p in PRESETS}


@dataclass(frozen=True)
class Example:
    file: str
    family: str
    description: str
    preset: str                  # the task shown with it in the Examples table
    transcript: str = ""

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.file


# Texts must match app/make_examples.py SPEECH.
EXAMPLES: list[Example] = [
    Example("speech.wav", "speech", "one English sentence (synthetic voice)", "asr",
            "The quick brown fox jumps over the lazy dog near the river bank."),
    Example("dictation.wav", "speech", "a sentence like SALMONN-tiny's training data, in a voice it never heard",
            "asr", "Have you seen my purple book anywhere, Mia?"),
    Example("question.wav", "speech", "a spoken question", "sqqa", "What is the tallest mountain in the world?"),
    Example("request.wav", "speech", "a spoken request to an assistant", "slots",
            "Please set an alarm for seven thirty tomorrow morning."),
    Example("two_speakers.wav", "speech", "two different speakers, one after the other", "speaker",
            "I will meet you at the station at noon. The weather has been lovely all week."),
    Example("overlap.wav", "speech", "the same two speakers talking over each other", "overlap"),
    Example("rain_beeps.wav", "sound", "rain with a device beeping now and then", "aac"),
    Example("melody.wav", "music", "a slow synthesized melody with a bass line", "music"),
    Example("speech_rain.wav", "speech + sound", "a spoken question over rain", "sac",
            "Should I take an umbrella when I go outside?"),
]
EXAMPLES_BY_FILE = {e.file: e for e in EXAMPLES}


@dataclass(frozen=True)
class LabItem:
    """One (clip, task, reference answer): the scale lab's perplexity curve for it."""
    preset: str
    example: str
    reference: str

    @property
    def label(self) -> str:
        p = PRESETS_BY_KEY[self.preset]
        return f"L{p.level} {p.title} · {self.example}"


LAB_ITEMS: list[LabItem] = [
    LabItem("asr", "speech.wav", EXAMPLES_BY_FILE["speech.wav"].transcript),
    LabItem("aac", "rain_beeps.wav", "Rain is falling steadily while an electronic device beeps now and then."),
    LabItem("music", "melody.wav", "A slow, calm melody played on a soft synthesized instrument with a simple bass line."),
    LabItem("en2de", "speech.wav", "Der schnelle braune Fuchs springt über den faulen Hund am Flussufer."),
    LabItem("sqqa", "question.wav", "The tallest mountain in the world is Mount Everest, at about 8,849 meters "
                                    "above sea level, on the border of Nepal and China."),
    LabItem("story", "rain_beeps.wav", "On a rainy night, Mia sat in the small lab at the edge of town. Rain drummed "
            "on the roof while the old monitor beeped every few seconds, counting down to the moment her "
            "experiment would finally wake up."),
    LabItem("sac", "speech_rain.wav", "Yes. I can hear steady rain in the background, so you should take an "
            "umbrella when you go outside."),
]
LAB_ITEMS_BY_LABEL = {i.label: i for i in LAB_ITEMS}
DEFAULT_LAB_ITEMS = [LAB_ITEMS[0].label, LAB_ITEMS[1].label, LAB_ITEMS[5].label]


def default_scales(trained: float) -> str:
    """The lab's default comma list: 0 .. trained scale in quarters (0, 1, 2, 3, 4 for SALMONN's 4.0)."""
    return ", ".join(f"{trained * k / 4:g}" for k in range(5))


def sweep_scales(trained: float) -> str:
    """Perplexity sweep: 0 .. 2x trained scale in eighths of the maximum."""
    return ", ".join(f"{trained * k / 4:g}" for k in range(9))
