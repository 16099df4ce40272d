"""Scores for SALMONN's answers, per task, as users of each task expect them.

Task names map to a metric family (`TASK_FAMILIES`, `family_of`); every family is also scored by the
perplexity of the reference answer under teacher forcing and by answer length (words):

| family        | tasks (official SALMONN names and ours)                         | metric                          |
|---------------|-----------------------------------------------------------------|---------------------------------|
| `wer`         | asr, asr_*, phone_recognition                                   | corpus word error rate (`wer`)  |
| `bleu`        | translation_ec, translation*, en2zh-style xx2yy                 | corpus BLEU (sacrebleu)         |
| `accuracy`    | QA, gender_recognition, gender_QA, emotion_recognition, speaker_verification | contains-rule accuracy (`answer_correct`) |
| `story`       | story, audio_story_telling, storytelling                        | following rate (`is_story`)     |
| `description` | audiocaption(_v2), music_description, music_caption             | following rate (`describes`)    |
| `other`       | any other name                                                  | perplexity and length only      |

Text normalisation (`words`, used by WER and the accuracy and following rules): lower case;
punctuation removed (a hyphen splits words, an apostrophe stays: "o'clock"); runs of spaces
collapsed; digits 0 to 12 spelled out as words ("4" and "four" match), every other number left as
written; Chinese, Japanese and Korean characters count one word each (so WER is a character error
rate for them).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

NUMBERS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af])")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\uac00-\ud7af]")

# The story rule (the paper's "following rate" for storytelling).
STORY_MIN_WORDS = 40
STORY_MIN_SENTENCES = 3          # sentences of at least 3 words
COPY_SHARE = 0.6                 # an answer with this share of its words from the clip's references is a copy
# The description rule: a caption of at least this many words that is not the clip's transcript.
DESCRIPTION_MIN_WORDS = 4

TASK_FAMILIES = {
    "asr": "wer", "phone_recognition": "wer",
    "translation_ec": "bleu",
    "qa": "accuracy", "gender_recognition": "accuracy", "gender_qa": "accuracy",
    "emotion_recognition": "accuracy", "speaker_verification": "accuracy",
    "story": "story", "audio_story_telling": "story", "storytelling": "story",
    "audiocaption": "description", "audiocaption_v2": "description", "music_description": "description",
    "music_caption": "description",
}
FAMILIES = ("wer", "bleu", "accuracy", "story", "description", "other")


def family_of(task: str) -> str:
    """The metric family of a task name (`TASK_FAMILIES`; asr_* -> wer, translation* and xx2yy -> bleu)."""
    name = str(task).strip().lower()
    if name in TASK_FAMILIES:
        return TASK_FAMILIES[name]
    if name.startswith("asr_"):
        return "wer"
    if name.startswith("translation") or re.fullmatch(r"[a-z]{2}2[a-z]{2}", name):
        return "bleu"
    return "other"


# ----------------------------------------------------------------------------------- normalisation

def words(text: str) -> list[str]:
    """Normalised words of `text` (see the module docstring)."""
    text = _CJK.sub(r" \1 ", str(text).lower().replace("-", " "))
    text = re.sub(r"[^\w' ]+|_", " ", text)
    return [NUMBERS.get(w, w) for w in text.split()]


# ----------------------------------------------------------------------------------- WER

def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, insertions and deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: all edits over all reference words (normalised by `words`)."""
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(refs, hyps))
    return errors / max(1, sum(len(words(r)) for r in refs))


# ----------------------------------------------------------------------------------- BLEU

def bleu_tokenizer(refs: Sequence[str]) -> str:
    """sacrebleu's tokenizer for these references: "zh" for Chinese, "char" for Japanese or Korean
    (their word tokenizers need MeCab), else its default "13a"."""
    text = "".join(refs)
    if _KANA_HANGUL.search(text):
        return "char"
    return "zh" if _CJK.search(text) else "13a"


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus BLEU-4 (0-100) of `hyps` against one reference each, as sacrebleu computes it."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=bleu_tokenizer(refs)).score)


def sentence_bleu(ref: str, hyp: str) -> float:
    """One answer's BLEU (0-100), smoothed as sacrebleu does for single sentences."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hyp, [ref], tokenize=bleu_tokenizer([ref])).score)


# ----------------------------------------------------------------------------------- accuracy

def answer_correct(reference: str, answer: str) -> bool:
    """The contains rule: every word of the short reference appears in the answer; for a yes/no
    reference the answer's first word must match; an estimate ("About 97.") counts when the answer's
    first number is within 4 % of it (MIREX tempo Accuracy 1)."""
    ref, ans = words(reference), words(answer)
    if not ref or not ans:
        return False
    if ref[0] in ("yes", "no"):
        return ans[0] == ref[0]
    if ref[0] == "about" and len(ref) == 2 and ref[1].isdigit():
        guess = next((int(w) for w in ans if w.isdigit()), None)
        return guess is not None and abs(guess - int(ref[1])) <= 0.04 * int(ref[1])
    return all(w in ans for w in ref)


# ----------------------------------------------------------------------------------- following rules

def copied_share(answer: str, references: Sequence[str]) -> float:
    """The share of the answer's words that occur in `references` (0 for an empty answer)."""
    ans = words(answer)
    ref_words = {w for r in references for w in words(r)}
    return sum(w in ref_words for w in ans) / len(ans) if ans else 0.0


def is_story(answer: str, references: Sequence[str]) -> bool:
    """A story: at least STORY_MIN_WORDS words in STORY_MIN_SENTENCES sentences, and not a copy of
    the clip's transcript or caption (`references`): under COPY_SHARE of its words come from them."""
    sentences = [s for s in re.split(r"[.!?]+", answer) if len(s.split()) >= 3]
    if len(words(answer)) < STORY_MIN_WORDS or len(sentences) < STORY_MIN_SENTENCES:
        return False
    return copied_share(answer, references) < COPY_SHARE


def describes(answer: str, transcripts: Sequence[str]) -> bool:
    """A description: at least DESCRIPTION_MIN_WORDS words and not the clip's transcript (under
    COPY_SHARE of its words come from `transcripts`)."""
    if len(words(answer)) < DESCRIPTION_MIN_WORDS:
        return False
    return not transcripts or copied_share(answer, transcripts) < COPY_SHARE


# ----------------------------------------------------------------------------------- perplexity

def perplexity(nlls: Sequence[float], counts: Sequence[int]) -> float:
    """Corpus perplexity exp(total NLL / total tokens) from each answer's mean NLL and token count."""
    total = sum(counts)
    if not total:
        return float("nan")
    return math.exp(sum(n * c for n, c in zip(nlls, counts)) / total)


# ----------------------------------------------------------------------------------- one answer

def score_answer(family: str, reference: str, answer: str, transcripts: Sequence[str] = (),
                 captions: Sequence[str] = ()) -> dict:
    """One answer's scores for its task family (the corpus metrics add these up per task): its length
    in words, and WER's edits and reference words, a sentence BLEU, whether it is right, or whether
    it follows the instruction (a story must not copy the clip's `transcripts` or `captions`, a
    description not its transcripts)."""
    scores: dict = {"words": len(words(answer))}
    if family == "wer":
        ref = words(reference)
        scores.update(errors=edit_distance(ref, words(answer)), ref_words=len(ref))
    elif family == "bleu":
        scores["bleu"] = round(sentence_bleu(reference, answer), 4)
    elif family == "accuracy":
        scores["correct"] = answer_correct(reference, answer)
    elif family == "story":
        scores["follows"] = is_story(answer, [*transcripts, *captions])
    elif family == "description":
        scores["follows"] = describes(answer, transcripts)
    return scores
