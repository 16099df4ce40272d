"""Stage 3's training data: long answers (stories, detailed descriptions) the LLM itself writes, LoRA
off and text only, from each clip's label description (activation tuning). The evaluation's story
references are written the same way."""
from __future__ import annotations

import random

import torch

from model.salmonn import SALMONN
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


def write_activation_data(model: SALMONN, clips: list[dict], n_story: int, n_detail: int, seed: int) -> list[dict]:
    """The LLM itself (LoRA off, text only) writes long answers from each clip's label description."""
    rng = random.Random(seed)
    pool = [c for c in clips if c["split"] == "train" and c["type"] != "speech"]
    rng.shuffle(pool)
    chosen = pool[: n_story + n_detail]
    tok = model.tokenizer
    requests = []
    for i, clip in enumerate(chosen):
        story = i < n_story
        if story:
            ask = (f"Write a short, vivid story of 5 to 7 sentences inspired by this sound: {clip['description']} "
                   "Make the sound important in the story.")
        else:
            ask = (f"An audio clip contains the following: {clip['description']} "
                   "Describe this audio in detail in 3 to 4 sentences, as if you were listening to it.")
        requests.append((clip, story, ask))
    texts = [tok.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True, tokenize=False)
             for _, _, ask in requests]
    torch.manual_seed(seed)
    rows = []
    for (clip, story, _), text in zip(requests, base_llm_write(model, texts, 180, temperature=0.8, top_p=0.9)):
        prompt = rng.choice(STORY_PROMPTS if story else DETAIL_PROMPTS)
        rows.append({"path": clip["path"], "text": text, "task": "audio_story_telling" if story else "detailed_description",
                     "Q": "", "prompt": full_prompt(prompt), "id": clip["id"]})
    return rows
