"""The product's docs: the committed model card is exactly what its generator writes from the recorded
results (assets/eval/training.json, assets/eval/results.json and results.md), the README's block table
names every module of model/, and the docs and code speak of the product, not of its development history
(that lives in docs/EXPERIMENTS.md)."""
import json
import math
import re

from model.defaults import ASSETS, REPO
from train import model_card


def test_committed_card_is_generated(tmp_path):
    out = tmp_path / "MODEL_CARD.md"
    assert model_card.main(["--out", str(out)]) == 0
    assert out.read_text() == (ASSETS / "MODEL_CARD.md").read_text(), \
        "assets/MODEL_CARD.md is stale or hand-edited: run `python -m train.model_card`"


def test_card_has_every_section():
    card = (ASSETS / "MODEL_CARD.md").read_text()
    for heading in ("## Parts", "## Data", "## Training", "## Held-out results", "## CTC-guided transcription",
                    "## Limitations", "## Reproduce"):
        assert heading in card


def test_recorded_training_summary_matches_the_shipped_weights():
    from safetensors import safe_open

    parts = json.loads((ASSETS / "eval" / "training.json").read_text())["parts"]
    with safe_open(str(ASSETS / "salmonn-tiny-activation.safetensors"), framework="pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        queries = f.get_slice("speech_query_tokens").get_shape()[1]
        lora = {f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k}
    assert (queries, total) == (parts["queries_per_window"], parts["trained_parameters"])
    assert lora == {"BF16" if parts["lora_stored_as"] == "bfloat16" else "F32"}


def test_readme_block_table_names_every_model_file():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## The model, block by block"):]
    table = table[:table.index("\n## ")]
    missing = [p.name for p in sorted((REPO / "model").glob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in table]
    assert not missing, f"README's block table lacks {missing}"


def test_docs_and_code_keep_no_diary():
    diary = re.compile(r"\b[Ss]ession[ -]\d|\b[Ii]ssue #?\d")
    files = [REPO / "README.md", ASSETS / "MODEL_CARD.md", REPO / "launch_app.py", *REPO.glob("*.sh")]
    for folder in ("model", "app", "train", "bench", "experiments", "tests"):
        files += [p for ext in ("py", "md", "sh") for p in sorted((REPO / folder).rglob(f"*.{ext}"))]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if diary.search(line)]
    assert not hits, f"development history belongs in docs/EXPERIMENTS.md: {hits}"


def test_card_records_open_vocabulary_speech_and_the_spelling_stage(tmp_path):
    """A run that used train.hearing_data folders and started from a spelling stage says so: the folder's
    voices and engines, the held-out engine, the spelling stage's curve end points and its command."""
    training = json.loads((ASSETS / "eval" / "training.json").read_text())
    training["data"]["speech_a"] = {"seed": 0, "clips": 3000, "engines": {"espeak": 0.5, "festival": 0.5},
                                    "template_share": 0.2, "noise_share": 0.3, "speed_perturb": 0.1,
                                    "by_engine": {"festival": 1473, "espeak": 1527}, "voices": 391, "hours": 3.185}
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"points": [
        {"step": 0, "seconds": 10, "held_out": {"wer": 0.778}},
        {"step": 100, "seconds": 70, "held_out": {"wer": 0.425}},
        {"step": 200, "seconds": 130, "held_out": {"wer": 0.432}}]}))
    training["spelling"] = model_card.spelling_record(str(curve), "python -m train.spell --data speech_a")
    results = json.loads((ASSETS / "eval" / "results.json").read_text())
    card = model_card.render(training, results, (ASSETS / "eval" / "results.md").read_text())
    assert "| `speech_a` | `hearing_data --clips 3000 --seed 0 --noise-share 0.3` | 3000 | 3.185 | 391 voices" in card
    assert "the flite engine is never used for training" in card
    assert "ran 200 steps and kept step 100" in card and "from 77.8 % to 42.5 %" in card
    assert "python -m train.spell --data speech_a" in card
    assert "synthetic voices (espeak-ng and festival)" in card


def test_stage_row_says_when_sound_clips_were_anchored_and_shows_the_lm_part_alone():
    stage = {"config": {"steps": 450, "batch_size": 16, "init_lr": 2.5e-4, "min_lr": 2.5e-5, "ctc_weight": 1.0,
                        "lm_weight": 1.0, "anchor_weight": 1.0},
             "history": [{"step": 10, "loss": 5.0, "ctc": 2.0, "anchor": 0.5, "seconds": 40},
                         {"step": 450, "loss": 2.2, "ctc": 1.0, "anchor": 0.2, "seconds": 1800}]}
    row = model_card.stage_row("instruction tuning", stage)
    assert "audio tokens held near the initial weights' (anchor × 1, relative distance 0.50 → 0.20)" in row["stage"]
    assert row["lm_loss"] == [2.5, 1.0] and row["minutes"] == 30


def test_stage_row_says_when_replayed_answers_were_distilled_and_shows_the_lm_part_alone():
    stage = {"config": {"steps": 240, "batch_size": 4, "init_lr": 2e-4, "min_lr": 2e-4, "lm_weight": 1.0,
                        "distill_weight": 2.0, "lora_only": True},
             "examples": 127, "replay": 254,
             "history": [{"step": 4, "loss": 2.7, "distill": 0.05, "seconds": 20},
                         {"step": 240, "loss": 1.6, "distill": 0.1, "seconds": 660}]}
    row = model_card.stage_row("activation tuning", stage)
    assert "replayed answers held near the instruction-tuned model's (KL × 2, 0.050 → 0.100)" in row["stage"]
    assert row["lm_loss"] == [2.6, 1.4] and row["minutes"] == 11
    # a log that has the LM term itself shows it as logged
    stage["history"] = [dict(h, lm=v) for h, v in zip(stage["history"], (2.65, 1.45))]
    assert model_card.stage_row("activation tuning", stage)["lm_loss"] == [2.65, 1.45]
