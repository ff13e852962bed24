"""Parameter settings as mergekit writes them, resolved for one tensor.

A merge parameter (``weight``, ``t``, ``density`` ...) is set in a recipe as one of:

* a value: ``t: 0.5``;
* a *gradient*, a list of numbers spread evenly over the layers and interpolated linearly in
  between: ``t: [0, 0.5, 1]`` is 0 at the first layer, 0.5 halfway and 1 at the last; a list of
  booleans or strings picks the entry at that position instead;
* values *conditional on the tensor's name*: a list of ``{filter: <substring>, value: <value or
  gradient>}`` entries, the first whose ``filter`` occurs in the tensor's name applying (an entry
  without a filter, or with ``filter: "*"``, matches every tensor):

  .. code-block:: yaml

      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5

These are mergekit's rules (``mergekit/config.py``, ``evaluate_setting``), position included: a
tensor of layer ``i`` of ``n`` sits at ``t = i / (n - 1)`` (1 for a one-layer model), every tensor
outside the layers (embeddings, final norm, head) at 0. A setting that matches no filter leaves
the parameter unset at that level, so the next level applies (a model's own setting, then the
merge's, then the method's default).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["check_setting", "evaluate", "filters", "layer_positions", "resolve"]

_SCALARS = (bool, int, float, str)
# The first all-digit path component is the layer index: model.layers.3.mlp..., transformer.h.3...;
# a later one (an expert's index in model.layers.3.experts.5...) is not.
_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def _number(value: Any) -> Any:
    """YAML reads ``1e-3`` as a string; mergekit validates it into a number, and so do we."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _conditions(setting: Any) -> list[Mapping[str, Any]] | None:
    if isinstance(setting, Mapping):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        return list(setting)
    return None


def check_setting(setting: Any) -> None:
    """Raise ``ValueError`` saying what is wrong if ``setting`` is not a value, a gradient or a list
    of ``{filter, value}`` conditions.

    Example:
        >>> check_setting([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}])
        >>> check_setting({"fliter": "mlp", "value": 1})
        Traceback (most recent call last):
        ...
        ValueError: a conditional setting has the keys 'filter' (optional) and 'value'; got 'fliter'
    """
    if isinstance(setting, _SCALARS):
        return
    conditions = _conditions(setting)
    if conditions is not None:
        for c in conditions:
            unknown = sorted(set(c) - {"filter", "value"})
            if unknown:
                raise ValueError("a conditional setting has the keys 'filter' (optional) and 'value'; got "
                                 + ", ".join(repr(k) for k in unknown))
            if "value" not in c:
                raise ValueError(f"the conditional setting {dict(c)} has no 'value'; add value: <number or list>")
            if c.get("filter") is not None and not isinstance(c["filter"], str):
                raise ValueError(f"a filter is a substring of tensor names, got {c['filter']!r}")
            value = c["value"]
            if not isinstance(value, _SCALARS) and not (isinstance(value, list) and value
                                                        and all(isinstance(e, _SCALARS) for e in value)):
                raise ValueError(f"a conditional value is a number or a list of numbers, got {value!r}")
        return
    if isinstance(setting, list) and setting and all(isinstance(e, _SCALARS) for e in setting):
        return
    if isinstance(setting, list) and not setting:
        return  # sets nothing, as in mergekit
    raise ValueError(f"a parameter is a value, a list of values over the layers, or a list of "
                     f"{{filter, value}} entries; got {setting!r}")


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value ``setting`` gives the tensor ``tensor_name`` at layer position ``t`` (0 to 1), or
    None when no condition matches it (or the list is empty).

    Example:
        >>> evaluate([0.0, 1.0, 0.0], "model.layers.1.mlp.up_proj.weight", 0.25)
        0.5
        >>> evaluate([{"filter": "self_attn", "value": 0.2}, {"value": 0.9}], "model.layers.0.mlp.up_proj.weight", 0)
        0.9
    """
    conditions = _conditions(setting)
    if conditions is not None:
        for c in conditions:
            f = c.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate(c["value"], tensor_name, t)
        return None
    if not isinstance(setting, list):
        return _number(setting)
    if not setting:
        return None
    values = [_number(v) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve(settings: Mapping[str, Any], tensor_name: str, t: float) -> dict[str, Any]:
    """Every setting of ``settings`` evaluated for one tensor; those no condition matches left out."""
    values = {name: evaluate(s, tensor_name, t) for name, s in settings.items()}
    return {name: v for name, v in values.items() if v is not None}


def filters(settings: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``{filter: parameter name}`` for every named filter the settings use."""
    out = {}
    for mapping in settings:
        for name, setting in mapping.items():
            for c in _conditions(setting) or ():
                f = c.get("filter")
                if f is not None and f != "*":
                    out.setdefault(f, name)
    return out


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """``t`` of every tensor name: ``i / (n - 1)`` for layer ``i`` of the ``n`` layers under its
    prefix (``model.layers``, ``transformer.h`` ...; 1 when there is one), 0 outside the layers.

    Example:
        >>> t = layer_positions(["model.embed_tokens.weight", "model.layers.0.mlp.weight",
        ...                      "model.layers.1.mlp.weight", "model.layers.2.mlp.weight"])
        >>> [t[n] for n in sorted(t)]
        [0.0, 0.0, 0.5, 1.0]
    """
    found = {name: m for name in names if (m := _LAYER.match(name))}
    layers: dict[str, set[int]] = {}
    for m in found.values():
        layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    positions = {}
    for name in names:
        m = found.get(name)
        if m is None:
            positions[name] = 0.0
            continue
        indices = sorted(layers[m.group(1)])
        n = len(indices)
        positions[name] = indices.index(int(m.group(2))) / (n - 1) if n > 1 else 1.0
    return positions
