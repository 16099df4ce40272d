"""Stage 3's training data: long answers (stories, detailed descriptions) the LLM itself writes, LoRA
off and text only, from each clip's label description (activation tuning). The evaluation's story
references are written the same way."""
from __future__ import annotations

import random

import torch

from model import decoding
from model.config import GenerateConfig
from model.metrics import is_story
from model.salmonn import SALMONN
from train.grounding import KEYWORDS, clip_labels, grounded
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


def names_only_its_sound(clip: dict, text: str) -> bool:
    """Whether `text` names the clip's main sound and no other sound (``train.grounding``'s keywords; speech
    words do not count against it, since stories' people talk, nor do labels sharing a keyword with the
    clip's). Without the second half, self-written stories that list every sound would pass for any clip."""
    labels = clip_labels(clip.get("labels") or {})
    if not labels or not grounded(text, labels):
        return False
    own = set().union(*(KEYWORDS[lab] for lab in labels))
    others = [lab for lab in KEYWORDS if lab not in labels and lab != "speech" and not KEYWORDS[lab] & own]
    return not grounded(text, others) if others else True


@torch.no_grad()
def own_stories(model: SALMONN, clips: list[dict], tokens: list[torch.Tensor], scale: float, seed: int,
                tries: int = 2, max_new_tokens: int = 180, temperature: float = 0.8, top_p: float = 0.9,
                batch: int = 16) -> list[dict]:
    """Stories the tuned model itself tells from each clip's audio tokens (`tokens[i]` for `clips[i]`,
    LoRA at `scale`, sampled), kept when they are stories that name the clip's main sound and no other
    (`names_only_its_sound`); a clip whose story does not is asked again (up to `tries` times), then left
    out. Tuning on the kept ones rewards the stories that came from hearing: the model sees no labels
    here, so a story that names the right sound read it from the audio."""
    rng = random.Random(seed)
    prompts = [rng.choice(STORY_PROMPTS) for _ in clips]
    written: dict[int, str] = {}
    todo = list(range(len(clips)))
    model.eval()
    for attempt in range(tries):
        gen = GenerateConfig(max_new_tokens=max_new_tokens, num_beams=1, do_sample=True, temperature=temperature,
                             top_p=top_p, repetition_penalty=model.cfg.generate.repetition_penalty,
                             seed=seed * 1000 + attempt)
        for start in range(0, len(todo), batch):
            part = todo[start:start + batch]
            texts = [model.prompt.conversation([full_prompt(prompts[i])]) for i in part]
            embeds, mask, _ = model.assemble([tokens[i] for i in part], texts)
            *_, last = decoding.generate(model, embeds, mask, gen, scale)
            for i, ids in zip(part, last.tokens):
                text = model.decode_text(ids)
                if is_story(text, [clips[i]["description"]]) and names_only_its_sound(clips[i], text):
                    written[i] = text
        todo = [i for i in todo if i not in written]
        if not todo:
            break
    return [{"path": clips[i]["path"], "text": written[i], "task": "audio_story_telling", "Q": "",
             "prompt": full_prompt(prompts[i]), "id": clips[i]["id"]} for i in sorted(written)]
