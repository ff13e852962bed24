"""Plain torch models: ``nn.Sequential`` MLPs and small CNNs (Conv2d + BatchNorm + Linear).

The table is read off the modules themselves: every hidden Linear or Conv2d output is a
group; the first layer's inputs and the last layer's outputs are fixed units. A Linear after
flattening a conv feature map sees ``channels x positions`` units, of which only the channel
factor moves.
"""

from __future__ import annotations

from torch import nn

from merge_graphs.errors import UnsupportedArchitectureError
from merge_graphs.symmetry.builder import SpecBuilder
from merge_graphs.tensors import infos

# Modules without parameters that act on each unit (or each channel) alike.
UNITWISE = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)
# Modules that mix units: fine only after the last layer, where nothing moves.
OUTPUT_ONLY = (nn.Softmax, nn.LogSoftmax)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def build(model: nn.Sequential):
    children = list(model.named_children())
    weighted = [n for n, m in children if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not weighted:
        raise UnsupportedArchitectureError("an nn.Sequential without Linear or Conv2d layers has nothing to align")
    has_conv = any(isinstance(m, nn.Conv2d) for _, m in children)
    b = SpecBuilder("cnn" if has_conv else "mlp", infos(model.state_dict()))
    current = None
    seen_last = False
    n_linear = n_conv = 0
    for name, m in children:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            conv = isinstance(m, nn.Conv2d)
            if conv and m.groups != 1:
                raise UnsupportedArchitectureError(f"layer {name}: grouped convolutions are not supported")
            n_in = m.in_channels if conv else m.in_features
            n_out = m.out_channels if conv else m.out_features
            if current is None:
                current = b.fixed("inputs", n_in)
            elif current.size != n_in:
                if conv or n_in % current.size:
                    raise UnsupportedArchitectureError(
                        f"layer {name} takes {n_in} inputs but the previous layer gives {current.size}")
                current = b.space(f"{current.name}.flat", *current.factors, (None, n_in // current.size))
            seen_last = name == weighted[-1]
            if seen_last:
                out = b.fixed("outputs", n_out)
            else:
                g = f"conv.{n_conv}" if conv else f"mlp.{n_linear}"
                out = b.space(g, (b.group(g, n_out), n_out))
            n_conv, n_linear = n_conv + conv, n_linear + (not conv)
            b.tensor(f"{name}.weight", out, current, *([None, None] if conv else []), role="conv" if conv else "linear")
            b.tensor(f"{name}.bias", out, role="bias")
            current = out
        elif isinstance(m, NORMS):
            if current is None:
                raise UnsupportedArchitectureError(f"layer {name}: a norm before the first weighted layer")
            b.tensor(f"{name}.weight", current, role="norm")
            b.tensor(f"{name}.bias", current, role="norm.bias")
            b.tensor(f"{name}.running_mean", current, role="norm.mean")
            b.tensor(f"{name}.running_var", current, role="norm.var")
        elif isinstance(m, UNITWISE) or (seen_last and isinstance(m, OUTPUT_ONLY)):
            continue
        else:
            raise UnsupportedArchitectureError(
                f"layer {name} ({type(m).__name__}) is not supported in an nn.Sequential; supported: "
                "Linear, Conv2d, BatchNorm1d/2d, LayerNorm and unit-wise activations, pooling, dropout, Flatten")
    return b.build()
