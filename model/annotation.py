"""The official SALMONN annotation format, read and checked for evaluation:

    {"annotation": [{"path": "clip.wav", "text": "reference answer", "task": "asr", "Q": "instruction"}]}

Paths are relative to the file; "task" defaults to "asr"; "Q", when given, is the instruction, else
the task's own (`TASK_PROMPTS`). Every problem is a ConfigError that names the row (annotation[i]).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import metrics
from .errors import ConfigError

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "assets" / "sweep" / "examples.json"
STORY_PROMPT = "Based on the audio, write a story in detail. Your story should be highly related to the audio."
# A row without "Q" is asked its task's instruction: the official SALMONN wording where one is known
# (demo and test prompts), SALMONN-tiny's training wording for gender.
TASK_PROMPTS = {
    "asr": "Recognize the speech and give me the transcription.",
    "translation_ec": "Listen to the speech and translate it into Chinese.",
    "en2zh": "Listen to the speech and translate it into Chinese.",
    "en2de": "Listen to the speech and translate it into German.",
    "en2ja": "Listen to the speech and translate it into Japanese.",
    "audiocaption": "Please describe the audio.",
    "audiocaption_v2": "Please describe the audio.",
    "music_description": "Listen to this music clip and describe the music.",
    "music_caption": "Listen to this music clip and describe the music.",
    "emotion_recognition": "Describe the emotion of the speaker in one word.",
    "gender_recognition": "Is the speaker male or female?",
    "story": STORY_PROMPT,
    "audio_story_telling": STORY_PROMPT,
}


@dataclass(frozen=True)
class Row:
    """One annotation row, checked: `audio` is the resolved file, `path` as the file wrote it."""
    id: str
    path: str
    audio: str
    task: str
    prompt: str
    text: str

    @property
    def family(self) -> str:
        return metrics.family_of(self.task)

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "task": self.task, "prompt": self.prompt, "text": self.text,
                "family": self.family}


def read_annotation(file: str | Path) -> list:
    """The "annotation" list of an official annotation file, or a ConfigError saying what is wrong."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"Annotation file not found: {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); expected {{\"annotation\": [{{\"path\", \"text\", "
                          "\"task\", \"Q\"}}, ...]}}.") from None
    rows = data.get("annotation") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{file} has no \"annotation\" list of rows; expected {{\"annotation\": [{{\"path\", "
                          "\"text\", \"task\", \"Q\"}}, ...]}}.")
    return rows


def check_row(item, where: str, resolve: Callable[[str], Path]) -> Row:
    """One raw row -> a Row; `where` names it in messages; `resolve` maps its path to the audio file
    (or raises a ConfigError saying why it cannot)."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where} is not an object with \"path\" and \"text\" (got {type(item).__name__}).")
    missing = [k for k in ("path", "text") if not isinstance(item.get(k), str) or (k == "path" and not item[k].strip())]
    if missing:
        raise ConfigError(f"{where} has no {' or '.join(repr(k) for k in missing)} (a string): every row needs the "
                          "audio \"path\" and the reference answer \"text\".")
    task = item.get("task", "asr")
    question = item.get("Q", "")
    if not isinstance(task, str) or not task.strip() or not isinstance(question, str):
        raise ConfigError(f"{where} ({item['path']}): \"task\" and \"Q\" must be strings.")
    prompt = question.strip() or TASK_PROMPTS.get(task.strip(), "")
    if not prompt:
        raise ConfigError(f"{where} ({item['path']}): task {task!r} has no instruction of its own; give the row a "
                          f"\"Q\", or use a task with one: {', '.join(sorted(TASK_PROMPTS))}.")
    try:
        audio = Path(resolve(item["path"]))
    except ConfigError as err:              # the resolver's own reason (the app: not uploaded)
        raise ConfigError(f"{where}: {err}") from None
    if not audio.is_file():
        raise ConfigError(f"{where}: audio file not found: {item['path']} (looked for {audio}).")
    # the id depends on the row's content, not its place: a results file stays valid when rows move
    key = json.dumps([item["path"], task.strip(), prompt, item["text"]], ensure_ascii=False)
    return Row(hashlib.sha1(key.encode()).hexdigest()[:12], item["path"], str(audio), task.strip(), prompt, item["text"])


def load_annotation(file: str | Path, resolve: Callable[[str], Path] | None = None,
                    limit: int | None = None) -> list[Row]:
    """Every row of an official annotation file, checked; the first `limit` of them when given. Paths
    are relative to the file unless `resolve` maps them (the app: uploaded clips only)."""
    file = Path(file)
    resolve = resolve or (lambda p: p if Path(p).is_absolute() else file.parent / p)
    rows = [check_row(item, f"{file.name}: annotation[{i}]", resolve) for i, item in enumerate(read_annotation(file))]
    return rows[:limit] if limit else rows
