import json

import pytest
import torch

from model.salmonn import SALMONN
from experiments import text_oracle
from train import recipe
from train.tasks import full_prompt
from train.trainer import TrainConfig, answer_targets

# clip -> (labels, the description make_data gives them)
SOUNDS = {"dog": ({"kind": "dog_bark", "count": 2}, "A dog barks twice."),
          "rain": ({"kind": "rain"}, "Rain falls steadily."),
          "bird": ({"kind": "bird"}, "Birds chirp and tweet."),
          "wind": ({"kind": "wind"}, "Wind blows in gusts.")}


def oracle_data(root):
    """A make_data-shaped folder: four labelled clips, one question each (the answer is in the words)."""
    root.mkdir()
    rows = [{"path": f"audio/train/{name}.wav", "task": "QA", "Q": "What sound?", "prompt": full_prompt("What sound?"),
             "text": name, "labels": {"type": "sound", "sound": sound}} for name, (sound, _) in SOUNDS.items()]
    for file in ("stage2_instruct.json", "eval.json"):
        (root / file).write_text(json.dumps({"annotation": rows}))
    return root


def test_words_stand_in_for_audio_tokens_and_lora_learns_to_read_them(tiny_cfg, tmp_path):
    """The oracle's audio tokens are the LLM's own embeddings of the description; LoRA-only training on
    them teaches it to answer from the words (the reading the tool measures) and moves nothing but LoRA."""
    data = oracle_data(tmp_path / "data")
    rows = text_oracle.qa_rows(data, "eval.json")
    assert [r["description"] for r in rows] == [text for _, text in SOUNDS.values()]
    torch.manual_seed(0)
    model = SALMONN.from_config(tiny_cfg).eval()
    words = text_oracle.word_tokens(model, "the rain is loud")
    ids = model.tokenizer("the rain is loud", add_special_tokens=False).input_ids
    assert torch.equal(words, model.llama_model.get_input_embeddings().weight[ids])

    before = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    cfg = TrainConfig(steps=60, batch_size=4, init_lr=2e-2, min_lr=2e-2, warmup_steps=0, seed=0)
    losses = text_oracle.train_lora(model, rows, cfg)
    assert losses[-1] < losses[0] / 2

    def loss_with(texts):   # the answers' loss when each row is given these descriptions
        with torch.no_grad():
            return model.loss([text_oracle.word_tokens(model, t) for t in texts],
                              [model.prompt.conversation([r["prompt"]]) for r in rows],
                              answer_targets(model.tokenizer, rows, 300)).item()

    right = [r["description"] for r in rows]
    # it reads: another clip's words make the answers much less likely than the clip's own
    assert loss_with(right) < 0.7 * loss_with(right[1:] + right[:1])
    acc, by_kind, answers = text_oracle.accuracy(model, rows, 4.0)
    assert len(answers) == 4 and by_kind["other"]["asked"] == 4 and acc == by_kind["other"]["correct"] / 4
    changed = {k for k, v in model.trainable_parameters().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def test_the_tool_refuses_a_folder_without_make_data_output(tmp_path):
    with pytest.raises(SystemExit, match="no make_data output"):
        text_oracle.main(["--data", str(tmp_path)])


def test_frozen_llm_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    """Emulated bfloat16 (an AVX2-only CPU) made a backward pass 50x slower than float32."""
    assert recipe.frozen_llm_dtype("float32") is torch.float32
    assert recipe.frozen_llm_dtype("bfloat16") is torch.bfloat16
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert recipe.frozen_llm_dtype("auto") is expected
