import pytest

from model.defaults import CHECKPOINTS
from experiments import split_probe
from train import make_data


def test_split_probe_reports_each_cell_and_the_shipped_model_reads_training_sentences(tmp_path, capsys):
    """`python -m experiments.split_probe` splits held-out ASR error into voice and sentence gaps; on training
    sentences in training voices the shipped instruction-tuned checkpoint must be nearly right."""
    data = tmp_path / "data"
    make_data.generate(data, seed=0, scale=0.02, workers=1, types=["speech"])
    result = split_probe.main(["--ckpt", str(CHECKPOINTS["instruction"]), "--data", str(data), "--n", "2"])
    assert list(result) == list(split_probe.CELLS)
    assert all(0.0 <= v < 3.0 for v in result.values())
    assert result["train sentences, train voices"] < 0.5
    assert "| held-out sentences, held-out voices |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no make_data output"):
        split_probe.main(["--ckpt", str(CHECKPOINTS["instruction"]), "--data", str(tmp_path / "none")])
