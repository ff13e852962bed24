"""The engine's Python API: align and merge in-memory models."""

import pytest
import torch
from tiny_models import make

import merge_graphs as mg
from merge_graphs.evaluate import accuracy, cross_entropy, interpolation_curve
from merge_graphs.lab.trainers import load_digits_split, train_digits_mlp


def test_merging_a_permuted_copy_gives_the_reference_back():
    for name in ("mlp", "bert-seqcls", "gpt2-lm", "llama-lm"):
        a = make(name)
        spec = mg.symmetry_spec(a)
        b = mg.permute(a, mg.random_permutations(spec, seed=7), spec)
        merged = mg.merge_models([a, b], method="linear", align="weight")
        for k, v in a.state_dict().items():
            assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), (name, k)


def test_three_model_merge_aligns_each_model_to_the_reference():
    a = make("bert-seqcls")
    spec = mg.symmetry_spec(a)
    b = mg.permute(a, mg.random_permutations(spec, seed=1), spec)
    c = mg.permute(a, mg.random_permutations(spec, seed=2), spec)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(2.0)
    merged = mg.merge_models([a, b, c], method="linear", weights=[1.0, 1.0, 2.0])
    # Aligned, the three are a, a and 2a: the weighted mean is (1 + 1 + 4) / 4 = 1.5 a.
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(merged.state_dict()[k], 1.5 * v, atol=1e-5), k


def test_task_vector_methods_use_the_base_model():
    base = make("llama-lm", seed=0)
    spec = mg.symmetry_spec(base)
    tuned = mg.permute(base, mg.random_permutations(spec, seed=3), spec)
    with torch.no_grad():
        tuned.lm_head.weight.add_(1.0)
    merged = mg.merge_models([tuned], method="task_arithmetic", base_model=base, weights=[0.5])
    assert torch.allclose(merged.lm_head.weight, base.lm_head.weight + 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a base"):
        mg.merge_models([tuned], method="ties")


def test_integer_buffers_are_copied_from_the_reference():
    a, b = make("cnn", seed=0), make("cnn", seed=1)
    b[1].num_batches_tracked.fill_(99)
    merged = mg.merge_models([a, b])
    assert torch.equal(merged[1].num_batches_tracked, a[1].num_batches_tracked)


def test_models_of_different_sizes_are_refused_with_the_reason():
    a = make("mlp")
    b = torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.ReLU(), torch.nn.Linear(33, 16), torch.nn.GELU(),
                            torch.nn.Linear(16, 3))
    with pytest.raises(mg.SpecMismatchError, match="mlp.0.*32.*33"):
        mg.align(a, b)
    with pytest.raises(mg.SpecMismatchError, match="bert model with a gpt2"):
        mg.align(make("bert"), make("gpt2"))
    with pytest.raises(ValueError, match="calibration"):
        mg.align(a, a, method="activation")
    with pytest.raises(ValueError, match="unknown alignment method"):
        mg.align(a, a, method="magic")


def test_activation_alignment_with_calibration_texts_recovers_a_permuted_copy():
    import transformers as T
    from tiny_models import minilm_path

    tokenizer = T.AutoTokenizer.from_pretrained(minilm_path())
    cfg = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=40, max_position_embeddings=64)
    torch.manual_seed(0)
    a = T.BertModel(cfg).eval()
    spec = mg.symmetry_spec(a)
    perms = mg.random_permutations(spec, seed=8)
    b = mg.permute(a, perms, spec)
    texts = ["the cat sat on the mat", "merging needs aligned units", "a b c d e f g", "hello world"] * 4
    found = mg.align(a, b, "activation", calibration=texts, tokenizer=tokenizer)
    expected = mg.invert_permutations(spec, perms)
    assert all(torch.equal(found.permutations[g], expected[g]) for g in spec.groups)


@pytest.fixture(scope="module")
def digits_pair():
    data = load_digits_split()
    return data, train_digits_mlp(seed=0), train_digits_mlp(seed=1)


def test_aligned_merge_of_different_seed_mlps_beats_naive_averaging(digits_pair):
    (_, _, x, y), a, b = digits_pair
    loss = lambda m: cross_entropy(m, x, y)  # noqa: E731
    naive = interpolation_curve(a, b, loss)
    for method in ("weight", "activation"):
        alignment = mg.align(a, b, method, calibration=digits_pair[0][0][:512])
        aligned_b = mg.permute(b, alignment.permutations)
        curve = interpolation_curve(a, aligned_b, loss)
        assert curve.barrier < 0.5 * naive.barrier, (method, curve.barrier, naive.barrier)
        merged = mg.merge_models([a, b], align=method, calibration=digits_pair[0][0][:512])
        assert accuracy(merged, x, y) > accuracy(mg.merge_models([a, b], align="none"), x, y)


def test_align_takes_another_gnn_encoder_as_an_object_or_a_folder(tmp_path):
    from merge_graphs.gnn import GraphEncoder
    from merge_graphs.gnn.pretrained import save_encoder

    a, b = make("gpt2-lm", seed=0), make("gpt2-lm", seed=1)
    torch.manual_seed(3)
    other = GraphEncoder(dim=16, layers=2).eval()
    save_encoder(other, tmp_path)
    given = mg.align(a, b, "gnn", encoder=other)
    saved = mg.align(a, b, "gnn", encoder=tmp_path)
    shipped = mg.align(a, b, "gnn")
    assert all(torch.equal(given.permutations[g], saved.permutations[g]) for g in given.permutations)
    # a random encoder does not match like the pretrained one: the argument is used, not ignored
    assert any(not torch.equal(given.permutations[g], shipped.permutations[g]) for g in given.permutations)
    with pytest.raises(ValueError, match="method='gnn'"):
        mg.align(a, b, "weight", encoder=other)
