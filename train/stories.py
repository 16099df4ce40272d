"""Stage 3's training data: long answers (stories, detailed descriptions) the LLM itself writes, LoRA
off and text only, from each clip's label description (activation tuning). The evaluation's story
references are written the same way."""
from __future__ import annotations

import random

import torch

from model.salmonn import SALMONN
from train.grounding import clip_labels, grounded
from train.tasks import full_prompt
from train.trainer import base_llm_write

STORY_PROMPTS = [
    "Based on the audio, write a story in detail. Your story should be highly related to the audio.",
    "Listen to the audio and write a short story inspired by it.",
    "Write a creative story about what is happening in this audio.",
]
DETAIL_PROMPTS = [
    "Describe the audio in detail.",
    "Tell me everything you can hear in this audio, in a few sentences.",
]


def _ask(clip: dict, story: bool) -> str:
    if story:
        return (f"Write a short, vivid story of 5 to 7 sentences inspired by this sound: {clip['description']} "
                "Make the sound important in the story.")
    return (f"An audio clip contains the following: {clip['description']} "
            "Describe this audio in detail in 3 to 4 sentences, as if you were listening to it.")


def _names_sound(clip: dict, text: str, within: int = 0) -> bool:
    labels = clip_labels(clip.get("labels") or {})
    return not labels or grounded(" ".join(text.split()[:within]) if within else text, labels)


def write_activation_data(model: SALMONN, clips: list[dict], n_story: int, n_detail: int, seed: int,
                          grounded_only: bool = False, tries: int = 3, within: int = 0) -> list[dict]:
    """The LLM itself (LoRA off, text only) writes long answers from each clip's label description.

    With `grounded_only`, an answer that never names the clip's main sound (``train.grounding``; clips
    with labels) is written again, up to `tries` times, and dropped if it still does not: a story the
    model learns to tell about a sound it does not mention teaches it to ignore the audio. With
    `within`, it must name the sound in its first `within` words: the tuned model learns the stories'
    openings best, so an opening that names the sound is what carries into its own stories."""
    rng = random.Random(seed)
    pool = [c for c in clips if c["split"] == "train" and c["type"] != "speech"]
    rng.shuffle(pool)
    chosen = [(clip, i < n_story) for i, clip in enumerate(pool[: n_story + n_detail])]
    tok = model.tokenizer
    torch.manual_seed(seed)
    written: dict[int, str] = {}
    todo = list(range(len(chosen)))
    for _ in range(tries if grounded_only else 1):
        texts = [tok.apply_chat_template([{"role": "user", "content": _ask(*chosen[i])}], add_generation_prompt=True,
                                         tokenize=False) for i in todo]
        for i, text in zip(todo, base_llm_write(model, texts, 180, temperature=0.8, top_p=0.9)):
            if not grounded_only or _names_sound(chosen[i][0], text, within):
                written[i] = text
        todo = [i for i in todo if i not in written]
        if not todo:
            break
    rows = []
    for i, (clip, story) in enumerate(chosen):
        prompt = rng.choice(STORY_PROMPTS if story else DETAIL_PROMPTS)
        if i in written:
            rows.append({"path": clip["path"], "text": written[i], "task": "audio_story_telling" if story else
                         "detailed_description", "Q": "", "prompt": full_prompt(prompt), "id": clip["id"]})
    return rows
