"""What vision transformers share (ViT, both towers of CLIP): the pre-LayerNorm encoder layer, the patch grid.

Each layer computes ``h <- h + o(attn(q, k, v of LN1(h)))`` then ``h <- h + fc2(act(fc1(LN2(h))))``:
heads and dims as :meth:`~merge_graphs.symmetry.builder.SpecBuilder.attention` says (no RoPE,
one key/value head per query head), one MLP group, and two LayerNorms that only the layer's own
q/k/v and fc1 read, so both fold. Families differ in what they call the parts (:class:`LayerNames`)
and in what surrounds the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from merge_graphs.symmetry.builder import SpecBuilder
from merge_graphs.symmetry.spec import Space


@dataclass(frozen=True)
class LayerNames:
    """Where one family keeps the parts of a layer, relative to the layer's prefix."""

    norm1: str
    q: str
    k: str
    v: str
    o: str
    norm2: str
    fc1: str
    fc2: str


def patch_positions(config) -> int:
    """Positions of a vision tower: one per image patch, and the class token's."""
    image, patch = config.image_size, config.patch_size
    (h, w), (ph, pw) = (x if isinstance(x, (list, tuple)) else (x, x) for x in (image, patch))
    return (h // ph) * (w // pw) + 1


def layer_norm(b: SpecBuilder, name: str, r: Space, readers: Sequence[str] | None = ()) -> None:
    """A LayerNorm over the stream ``r``; unless ``readers`` is None, a pre-norm read by the linear
    maps ``readers`` (none: its output is the model's output, kept as it is when folding).

    ``readers=None`` is a LayerNorm whose output *is* the stream (CLIP's ``pre_layrnorm``): not a
    pre-norm, nothing to fold into.
    """
    b.tensor(f"{name}.weight", r, role="norm")
    b.tensor(f"{name}.bias", r, role="norm.bias")
    if readers is not None:
        b.norm(f"{name}.weight", f"{name}.bias", [(f"{x}.weight", f"{x}.bias") for x in readers])


def encoder_layer(b: SpecBuilder, prefix: str, scope: str, r: Space, names: LayerNames, n_heads: int,
                  head_dim: int, intermediate: int) -> None:
    """Label one pre-LN encoder layer stored under ``prefix`` (e.g. ``vit.layers.0``), its groups
    named under ``scope`` (e.g. ``layers.0`` or ``vision.layers.0``), reading and writing ``r``."""
    q, k, v, o = b.attention(f"{scope}.attn", n_heads, n_heads, head_dim, rope=False)
    L = f"{prefix}."
    layer_norm(b, L + names.norm1, r, [L + names.q, L + names.k, L + names.v])
    for x, part, space in (("q", names.q, q), ("k", names.k, k), ("v", names.v, v)):
        b.tensor(f"{L}{part}.weight", space, r, role=f"attn.{x}")
        b.tensor(f"{L}{part}.bias", space, role="bias")
    b.tensor(f"{L}{names.o}.weight", r, o, role="attn.o")
    b.tensor(f"{L}{names.o}.bias", r, role="bias")
    layer_norm(b, L + names.norm2, r, [L + names.fc1])
    h = b.space(f"{scope}.mlp", (b.group(f"{scope}.mlp", intermediate), intermediate))
    b.tensor(f"{L}{names.fc1}.weight", h, r, role="mlp.up")
    b.tensor(f"{L}{names.fc1}.bias", h, role="bias")
    b.tensor(f"{L}{names.fc2}.weight", r, h, role="mlp.down")
    b.tensor(f"{L}{names.fc2}.bias", r, role="bias")
