"""Modules: the parts of a multi-part model that a mergekit recipe's ``modules:`` section merges apart.

A vision-language model holds a text decoder, a vision tower and a projector between them, each with
a stack of layers of its own. mergekit names these parts per architecture (``text_decoder``,
``vision_tower``, ``multi_modal_projector`` ...) and lets a recipe give each its own models or
slices and parameters. :data:`MODULES` is that table, as data: per ``model_type``, each module's
tensor-name prefixes (a tensor belongs to the module of its longest matching prefix) and the config
key of its layer count (set when slices change the depth). A model of any other type is one module,
``default``, as in mergekit.

Example:
    >>> parts = split_modules(["language_model.model.norm.weight", "vision_tower.ln_pre.weight",
    ...                        "multi_modal_projector.linear_1.weight"], "mistral3")
    >>> {k: len(v) for k, v in parts.items()}
    {'text_decoder': 1, 'vision_tower': 1, 'multi_modal_projector': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from merge_graphs.errors import MergeParameterError

__all__ = ["DEFAULT", "MODULES", "Module", "check_modules", "modules_of", "selector", "split_modules"]

#: The one module of a model whose type has no entry in :data:`MODULES`.
DEFAULT = "default"


@dataclass(frozen=True)
class Module:
    """One part of a model: the tensors whose names start with one of ``prefixes``, and the dotted
    config key of its layer count (None: it has no stack of layers)."""

    prefixes: tuple[str, ...]
    layers_key: str | None


_LLAVA_LIKE = {
    "text_decoder": Module(("language_model.",), "text_config.num_hidden_layers"),
    "vision_tower": Module(("vision_tower.",), "vision_config.num_hidden_layers"),
    "multi_modal_projector": Module(("multi_modal_projector.",), None),
}
_QWEN_VL = {
    "text_decoder": Module(("model.", "lm_head."), "text_config.num_hidden_layers"),
    "vision_tower": Module(("visual.",), "vision_config.depth"),
    "multi_modal_projector": Module(("visual.merger.",), None),
}

#: mergekit 0.1.5's module names per model type, with the checkpoint names transformers 5 writes.
MODULES: dict[str, dict[str, Module]] = {
    "mistral3": _LLAVA_LIKE,
    "gemma3": _LLAVA_LIKE,
    "llama4": {
        "text_decoder": Module(("language_model.",), "text_config.num_hidden_layers"),
        "vision_model": Module(("vision_model.",), "vision_config.num_hidden_layers"),
        "multi_modal_projector": Module(("multi_modal_projector.",), None),
    },
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": {
        "text_decoder": Module(("model.language_model.", "lm_head."), "text_config.num_hidden_layers"),
        "vision_tower": Module(("model.visual.",), "vision_config.depth"),
        "multi_modal_projector": Module(("model.visual.merger.", "model.visual.deepstack_merger_list."), None),
    },
}
MODULES["qwen3_vl_moe"] = MODULES["qwen3_vl"]


def modules_of(model_type: str | None) -> dict[str, Module]:
    """The modules of a model of ``model_type``: its :data:`MODULES` entry, else one ``default``
    module holding every tensor (whose layer count is ``num_hidden_layers``)."""
    return MODULES.get(model_type or "", {DEFAULT: Module(("",), "num_hidden_layers")})


def split_modules(names: Sequence[str], model_type: str | None) -> dict[str, list[str]]:
    """``names`` by module (:func:`modules_of`), each in the given order; every module listed, also
    one that holds none of ``names``.

    Raises:
        MergeParameterError: a name that no module's prefixes match.
    """
    modules = modules_of(model_type)
    parts: dict[str, list[str]] = {m: [] for m in modules}
    for name in names:
        matches = [(len(p), m) for m, module in modules.items() for p in module.prefixes if name.startswith(p)]
        if not matches:
            raise MergeParameterError(f"tensor {name!r} belongs to none of the modules of a {model_type} model "
                                      f"({', '.join(modules)}); merge it with models: instead of modules:")
        parts[max(matches)[1]].append(name)
    return parts


def selector(model_type: str | None, module: str) -> Callable[[Sequence[str]], list[str]]:
    """A function picking the names of ``module`` from a model's names (as :func:`split_modules`)."""
    def select(names: Sequence[str]) -> list[str]:
        return split_modules(names, model_type)[module]

    return select


def check_modules(given: Sequence[str], model_type: str | None) -> dict[str, Module]:
    """The modules of a ``model_type`` model that a recipe's ``modules:`` names, in the recipe's order.

    Raises:
        MergeParameterError: a name that is not one of the model's modules, or a module left out
            (mergekit would write a model without its tensors; here the output is whole or absent).
    """
    table = modules_of(model_type)
    unknown = [m for m in given if m not in table]
    if unknown:
        raise MergeParameterError(f"modules {unknown} are not parts of a {model_type} model; its modules are "
                                  f"{list(table)}")
    missing = [m for m in table if m not in given]
    if missing:
        raise MergeParameterError(f"modules: gives {list(given)}, and a {model_type} model also has {missing}; give "
                                  f"each part its models (e.g. {missing[0]}: {{models: [{{model: <one of the models>}}]}})"
                                  ", so that the output is a whole model")
    return {m: table[m] for m in given}
