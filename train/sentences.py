"""Open-vocabulary sentences for the speech clips, written offline by the bundled LLM itself.

The template grammar in ``synth`` has ~540 words, so a model trained only on it answers any speech
with a plausible template sentence (94 % WER on everyday sentences outside it). SmolLM2, run as a
plain text model (LoRA off), writes short everyday sentences on many topics; we keep only those that
espeak-ng reads exactly as written (letters and simple punctuation, no digits or symbols) and cache
them as JSON in the data folder:

    python -m train.sentences --out data/sentences.json [--n 3000] [--seed 0]

or, without the LLM, a larger pool from Debian's text packages (fortunes; WordNet's usage examples):

    python -m train.sentences --fortunes --wordnet --out runs_h/pool_wn.json

Which sentences are held out is decided by ``synth.sentence_split`` (a content hash) when
``synth.load_sentences`` reads the corpus, as for the templates; the fixed everyday sentences of the
out-of-domain ASR evaluation (``OPEN_EVAL_SENTENCES``) are never kept.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from train.evaluate import OPEN_EVAL_SENTENCES, words
from train.trainer import base_llm_write

TOPICS = [
    "cooking dinner", "a visit to the doctor", "the weather", "a football match", "school homework",
    "shopping for clothes", "a train journey", "a birthday party", "gardening", "a job interview",
    "moving house", "a family holiday", "learning to swim", "fixing a bicycle", "a rainy afternoon",
    "the news", "a new phone", "a museum visit", "walking the dog", "a wedding", "the dentist",
    "a science lesson", "a camping trip", "baking bread", "a traffic jam", "a lost wallet", "the library",
    "a thunderstorm", "a piano lesson", "cleaning the house", "a coffee shop", "an airport", "a hospital",
    "a farm", "the beach", "a mountain hike", "a history class", "a restaurant", "a broken computer",
    "a neighbour", "a concert", "winter mornings", "a summer evening", "a long meeting", "a new job",
    "an old friend", "a football coach", "the supermarket", "a bus driver", "painting a room",
    "a school trip", "a cat", "a horse", "the ocean", "a small village", "a busy city", "a bakery",
    "a fire drill", "a power cut", "a hotel room", "a map", "a letter from grandma", "a game of chess",
    "a marathon", "a cold", "a recipe", "the garden fence", "a flat tyre", "an exam", "a holiday photo",
    "a river", "a forest", "the stars at night", "a radio show", "a podcast", "a television series",
    "a kitchen accident", "a surprise visit", "a lecture", "a phone call", "a delivery", "a storm at sea",
    "the first day of school", "a car repair", "a music festival", "the post office", "the bank",
    "a parking ticket", "a picnic", "a bookshop", "a science fair", "an elevator", "a snowy road",
    "a noisy neighbour", "a quiet morning", "a team project", "a lost key", "a broken window",
]
# Few-shot list items (ours): a list the model continues gives far more usable sentences than an
# instruction, which SmolLM2-135M mostly answers with a paragraph.
EXAMPLES = [
    "I need to buy milk on the way home.", "Did you remember to lock the back door?",
    "The meeting has been moved to the afternoon.", "Could you help me carry these boxes upstairs?",
    "It has been raining since early this morning.", "My sister is learning to play the guitar.",
    "Please close the window before you go to bed.", "We saw a beautiful rainbow over the hills.",
    "The kitchen smells wonderful today.", "Why is the shop closed so early?",
    "Our neighbours are painting their fence green.", "Where did you park the car last night?",
    "The soup is too hot to eat right now.", "He always takes the bus to work.",
    "Let me know when the package arrives.", "The children are playing in the garden.",
]
_KEEP = re.compile(r"^[A-Z][A-Za-z',\- ]*[a-z][.?!]$")
_WORDS = (5, 16)
FORTUNES = Path("/usr/share/games/fortunes")
# Fortune files whose lines are mostly jargon, code, names or offensive jokes, not everyday English.
FORTUNE_SKIP = {"ascii-art", "computers", "debian", "drugs", "ethnic", "goedel", "knghtbrd", "linux", "linuxcookie",
                "men-women", "perl", "pratchett", "startrek", "translate-me", "zippy"}
# WordNet's usage examples (the quoted phrases of each gloss): tens of thousands of short everyday
# sentences over its whole vocabulary.
WORDNET = Path("/usr/share/wordnet")
# Capitalised words that are not names: "I" and its contractions.
_NOT_NAMES = {"I", "I'm", "I'll", "I've", "I'd"}
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|Inc|Co)\.")


def normalized(text: str) -> str:
    """Duplicate test key: the words WER compares."""
    return " ".join(words(text))


def clean(text: str, min_words: int = _WORDS[0], max_words: int = _WORDS[1]) -> str | None:
    """One sentence espeak-ng says exactly as written, or None."""
    text = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", text).strip().strip('"').strip()
    if not _KEEP.match(text) or "--" in text or " - " in text:
        return None
    n = len(text.split())
    if not min_words <= n <= max_words or any(w.isupper() and len(w) > 1 for w in text.split()):
        return None
    return text


def pool_sentence(text: str) -> str | None:
    """A clean everyday sentence of 4-16 words with at most one capitalised word after the first
    (names make a transcript unguessable from sound alone, and fortunes are full of them), or None."""
    text = clean(" ".join(text.split()), 4, 16)
    if text is None:
        return None
    capitals = [w for w in text.split()[1:] if w[0].isupper() and w.strip(",.?!") not in _NOT_NAMES]
    return text if len(capitals) <= 1 else None


def fortune_entries(folder: Path = FORTUNES) -> list[str]:
    """Every fortune (the text between "%" lines) of the plain-text files in `folder`, but FORTUNE_SKIP."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.suffix or not path.is_file() or path.name in FORTUNE_SKIP:
            continue
        entries += path.read_text(encoding="latin-1").split("\n%\n")
    return entries


def wordnet_entries(folder: Path = WORDNET) -> list[str]:
    """Every usage example in WordNet's glosses, as a sentence: first letter capitalised, a full stop
    where it has no end mark."""
    entries = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:      # the licence header; synsets have a gloss
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                example = example.strip()
                if example:
                    entries.append(example[0].upper() + example[1:] + ("" if example[-1] in ".?!" else "."))
    return entries


def sentence_pool(entries: list[str]) -> list[str]:
    """The distinct everyday sentences (``pool_sentence``) in free text `entries`, in a fixed order,
    never one of the everyday evaluation sentences."""
    banned = {normalized(s) for s in OPEN_EVAL_SENTENCES}
    kept: dict[str, str] = {}
    for entry in entries:
        if _ABBREVIATION.search(entry):    # "Mr. Smith" would be split into two broken sentences
            continue
        for part in re.split(r"(?<=[.?!])\s+(?=[A-Z])", " ".join(entry.split())):
            s = pool_sentence(part)
            if s and normalized(s) not in banned:
                kept.setdefault(normalized(s), s)
    return sorted(kept.values())


def candidates(answer: str) -> list[str]:
    """The clean sentences of a continued list: its first line, then each line that starts "- "
    (the model wanders off after the list; what follows is not kept)."""
    out = []
    for i, line in enumerate(answer.splitlines()):
        line = line.strip()
        if i and not line.startswith("- "):
            break
        out += re.split(r"(?<=[.?!])\s+(?=[A-Z])", line.removeprefix("- ").strip())
    return [s for s in (clean(c) for c in out) if s]


def write_sentences(model, n: int, seed: int = 0, batch: int = 32, log=print) -> list[str]:
    """Let the LLM (text only, LoRA off) continue lists of everyday sentences on many topics until
    ``n`` distinct, clean ones are kept."""
    banned = {normalized(s) for s in OPEN_EVAL_SENTENCES + EXAMPLES}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kept: dict[str, str] = {}
    start, asked = time.perf_counter(), 0
    while len(kept) < n:
        texts = [f"Simple sentences that people say in everyday life, about {rng.choice(TOPICS)}:\n"
                 + "".join(f"- {e}\n" for e in rng.sample(EXAMPLES, 3)) + "-" for _ in range(batch)]
        for answer in base_llm_write(model, texts, 40, temperature=0.9, top_p=0.95, batch=batch):
            for s in candidates(answer):
                key = normalized(s)
                if key not in banned:
                    kept.setdefault(key, s)
        asked += batch
        log(f"  {len(kept)} sentences from {asked} lists ({time.perf_counter() - start:.0f} s)")
    return sorted(rng.sample(sorted(kept.values()), n))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/sentences.json")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fortunes", action="store_true",
                    help=f"instead: every clean everyday sentence of Debian's fortunes ({FORTUNES}; apt-get install "
                         "fortunes fortunes-min), no LLM; the same JSON format, never shipped")
    ap.add_argument("--wordnet", action="store_true",
                    help=f"instead (or with --fortunes): every clean usage example of WordNet's glosses ({WORDNET}; "
                         "apt-get install wordnet-base), no LLM")
    args = ap.parse_args(argv)
    if args.fortunes or args.wordnet:
        sources = [(FORTUNES, fortune_entries, "fortunes fortunes-min")] if args.fortunes else []
        sources += [(WORDNET, wordnet_entries, "wordnet-base")] if args.wordnet else []
        entries = []
        for folder, read, package in sources:
            if not folder.is_dir():
                raise SystemExit(f"{folder} not found: apt-get install -y {package}")
            entries += read(folder)
        pool = sentence_pool(entries)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"source": ", ".join(str(f) for f, _, _ in sources), "sentences": pool},
                                             indent=0) + "\n")
        print(f"wrote {len(pool)} sentences -> {args.out}")
        return
    from model.defaults import bundled_config
    from model.salmonn import SALMONN

    model = SALMONN.from_config(bundled_config())
    sentences = write_sentences(model, args.n, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seed": args.seed, "sentences": sentences}, indent=0) + "\n")
    print(f"wrote {len(sentences)} sentences -> {args.out}")


if __name__ == "__main__":
    main()
