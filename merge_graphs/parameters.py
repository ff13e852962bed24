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

These are mergekit's rules (``mergekit/config.py``, ``evaluate_setting``); where a tensor sits
(``t``) is :func:`merge_graphs.slices.layer_positions`'. A setting that matches no filter leaves
the parameter unset at that level, so the next level applies (a model's own setting, then the
merge's, then the method's default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_setting", "evaluate", "filters", "resolve"]

_SCALARS = (bool, int, float, str)


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
