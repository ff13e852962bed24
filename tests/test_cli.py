"""The merge-graphs command."""

import json
import subprocess
import sys

import pytest
from tiny_models import make, minilm_path

import merge_graphs as mg
from merge_graphs.cli import main


def test_inspect_reports_groups_and_graph_of_a_real_checkpoint(capsys):
    assert main(["inspect", minilm_path(), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "bert" and report["groups"]["residual"]["size"] == 384
    assert report["groups"]["layers.0.attn.qk"] == {"size": 32, "parent": "layers.0.attn.heads"}
    assert report["carried"] == ["embeddings.position_ids"]
    assert report["graph"]["edges"] == 22682112


def test_inspect_a_saved_tiny_llama(tmp_path, capsys):
    make("llama-lm").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.attn.query_heads" in out and "RoPE" in out


@pytest.mark.parametrize("name, says", [
    ("qwen3-lm", "q/k RMSNorm over each head's dims"), ("gemma-lm", "RMSNorm scales by (1 + weight)"),
    ("gemma2-lm", "post_attention_layernorm, post_feedforward_layernorm"), ("gemma3-text", "permutations only"),
    ("olmo2-lm", "over the whole projection"), ("phi3-lm", "fused qkv_proj"),
])
def test_inspect_a_saved_tiny_decoder_of_each_family(tmp_path, capsys, name, says):
    model = make(name)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == model.config.model_type and any(says in note for note in report["notes"])
    graph = mg.neural_graph(model)
    # read under the model's names, a tied head's edges count as the model's own do
    assert report["graph"] == {"node_sets": len(graph.node_sets), "nodes": graph.num_nodes,
                               "edges": graph.num_edges}


def test_missing_model_exits_non_zero_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merge_graphs.cli", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_help_says_what_the_tool_does_with_an_example_per_subcommand():
    proc = subprocess.run([sys.executable, "-m", "merge_graphs.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    description = proc.stdout.split("\n\n", 1)[1]
    assert description.startswith("Merge Hugging Face models trained from different initializations")
    for command in ("recipe.yaml", "inspect", "push", "embed", "bench", "pretrain-gnn"):
        assert f"  merge-graphs {command}" in description, command
    assert "``" not in proc.stdout  # no reStructuredText from developer docstrings
