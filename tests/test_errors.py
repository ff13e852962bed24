"""Errors a user can cause with merge parameters reach the command line as one clear line, exit 1,
with nothing written (no traceback, no output folder)."""

from __future__ import annotations

import pytest
import transformers as T
import yaml

from merge_graphs.cli import main
from merge_graphs.errors import MergeGraphsError, MergeParameterError
from merge_graphs.methods import merge_tensors


@pytest.fixture
def folders(tmp_path):
    config = T.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    out = []
    for seed in (0, 1):
        T.set_seed(seed)
        folder = tmp_path / f"m{seed}"
        T.GPT2LMHeadModel(config).save_pretrained(folder)
        out.append(str(folder))
    return out


@pytest.mark.parametrize(("merge", "weights", "says"), [
    ({"method": "linear", "parameters": {"normalize": True}}, [1.0, -1.0], "do not sum to 0"),
    # mergekit 0.1.5's TIES keeps at least one entry at any positive density: no error there any more
    ({"method": "della", "parameters": {"density": 0.9}}, [1.0, 1.0], "lower epsilon (default 0.15)"),
])
def test_bad_merge_parameters_exit_1_with_the_fix_and_write_nothing(tmp_path, folders, capsys, merge, weights, says):
    recipe = {"models": [{"model": f, "weight": w} for f, w in zip(folders, weights)], "merge": merge,
              "align": {"method": "none"}, "output": {"path": str(tmp_path / "out")}}
    if merge["method"] == "della":
        recipe["base_model"] = folders[0]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("merge-graphs: error: ") and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_parameter_errors_are_merge_graphs_errors_and_value_errors():
    import torch

    with pytest.raises(MergeParameterError) as caught:
        merge_tensors("linear", [torch.ones(2), torch.ones(2)], model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
    assert isinstance(caught.value, MergeGraphsError) and isinstance(caught.value, ValueError)
