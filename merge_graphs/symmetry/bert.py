"""BERT-family encoders: BERT and RoBERTa (post-LayerNorm).

The residual stream is one group across the whole model: every LayerNorm, the embeddings and
each block's input and output projections. Post-LN carries the normalized stream forward, so
unlike pre-norm decoders the stream has no orthogonal symmetry: permutations only.
"""

from __future__ import annotations

from merge_graphs.symmetry.builder import SpecBuilder, find_prefix

ARCHITECTURES = (
    "BertModel", "BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM",
    "RobertaModel", "RobertaForSequenceClassification", "RobertaForTokenClassification", "RobertaForMaskedLM",
)


def build(b: SpecBuilder, config, architecture: str):
    base = "roberta" if config.model_type == "roberta" else "bert"
    p = find_prefix(b.stored, base, "embeddings.word_embeddings.weight")
    d, n_layers = config.hidden_size, config.num_hidden_layers
    n_heads = config.num_attention_heads
    vocab = b.fixed("vocab", config.vocab_size)
    r = b.space("residual", (b.group("residual", d), d))

    def layer_norm(name):
        b.tensor(f"{name}.weight", r, role="norm")
        b.tensor(f"{name}.bias", r, role="norm.bias")

    e = f"{p}embeddings"
    b.tensor(f"{e}.word_embeddings.weight", vocab, r, role="embed", fan_in_axis=0)
    b.tensor(f"{e}.position_embeddings.weight", b.fixed("positions", config.max_position_embeddings), r,
             role="embed.position", fan_in_axis=0)
    b.tensor(f"{e}.token_type_embeddings.weight", b.fixed("token_types", config.type_vocab_size), r,
             role="embed.token_type", fan_in_axis=0)
    layer_norm(f"{e}.LayerNorm")

    for i in range(n_layers):
        L = f"{p}encoder.layer.{i}"
        q, k, v, o = b.attention(f"layers.{i}.attn", n_heads, n_heads, d // n_heads, rope=False)
        for proj, space in (("query", q), ("key", k), ("value", v)):
            b.tensor(f"{L}.attention.self.{proj}.weight", space, r, role=f"attn.{proj[0]}")
            b.tensor(f"{L}.attention.self.{proj}.bias", space, role="bias")
        b.tensor(f"{L}.attention.output.dense.weight", r, o, role="attn.o")
        b.tensor(f"{L}.attention.output.dense.bias", r, role="bias")
        layer_norm(f"{L}.attention.output.LayerNorm")
        h = b.space(f"layers.{i}.mlp", (b.group(f"layers.{i}.mlp", config.intermediate_size), config.intermediate_size))
        b.tensor(f"{L}.intermediate.dense.weight", h, r, role="mlp.up")
        b.tensor(f"{L}.intermediate.dense.bias", h, role="bias")
        b.tensor(f"{L}.output.dense.weight", r, h, role="mlp.down")
        b.tensor(f"{L}.output.dense.bias", r, role="bias")
        layer_norm(f"{L}.output.LayerNorm")

    pooler = b.space("pooler", (b.group("pooler", d), d))
    b.tensor(f"{p}pooler.dense.weight", pooler, r, role="linear")
    b.tensor(f"{p}pooler.dense.bias", pooler, role="bias")

    labels = b.fixed("labels", getattr(config, "num_labels", 2))
    if architecture.endswith("ForSequenceClassification") and base == "roberta":
        c = b.space("classifier", (b.group("classifier", d), d))
        b.tensor("classifier.dense.weight", c, r, role="linear")
        b.tensor("classifier.dense.bias", c, role="bias")
        b.tensor("classifier.out_proj.weight", labels, c, role="linear")
        b.tensor("classifier.out_proj.bias", labels, role="bias")
    elif architecture.endswith("ForSequenceClassification"):
        b.tensor("classifier.weight", labels, pooler, role="linear")
        b.tensor("classifier.bias", labels, role="bias")
    elif architecture.endswith("ForTokenClassification"):
        b.tensor("classifier.weight", labels, r, role="linear")
        b.tensor("classifier.bias", labels, role="bias")
    elif architecture.endswith("ForMaskedLM"):
        # The transform and its LayerNorm stay in the residual basis: the decoder is tied to
        # the word embeddings, whose columns the residual permutation moves.
        head = "cls.predictions" if base == "bert" else "lm_head"
        dense, norm = ("transform.dense", "transform.LayerNorm") if base == "bert" else ("dense", "layer_norm")
        b.tensor(f"{head}.{dense}.weight", r, r, role="linear")
        b.tensor(f"{head}.{dense}.bias", r, role="bias")
        layer_norm(f"{head}.{norm}")
        b.tensor(f"{head}.decoder.weight", vocab, r, role="unembed")
        b.tensor(f"{head}.decoder.bias", vocab, role="bias")
        b.tensor(f"{head}.bias", vocab, role="bias")

    bare = architecture.endswith("Model")
    return b.build(
        outputs={"last_hidden_state": "residual", "pooler_output": "pooler"} if bare else {},
        notes=("post-LayerNorm: the residual stream admits permutations, not rotations",),
        unrotated=(
            f"{b.family} is a post-LayerNorm encoder: its residual stream cannot be rotated, so norm "
            "folding and residual rotation do not apply. Each block's LayerNorm output is itself the stream "
            "carried to the next block (h <- LayerNorm(h + f(h))), so the LayerNorm gains and biases act on "
            "the stream and cannot be folded into the layers that read it, and the masked-LM head (its "
            "LayerNorm and the decoder tied to the embeddings) breaks it too. Only permutations of the "
            "residual stream preserve such a model: align it with permutations (weight or activation "
            "matching) instead."),
    )
