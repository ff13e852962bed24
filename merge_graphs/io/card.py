"""The model card (``README.md``) of a merged model: Hub metadata, how it was merged, the recipe.

The YAML front matter is made with ``huggingface_hub.ModelCardData``, so ``ModelCard`` and
``metadata_load`` read it back and the Hub shows the model's lineage: ``base_model`` (the Hub
ids among the merged models), ``base_model_relation: merge``, ``tags: [merge, merge-graphs]``,
``library_name: transformers``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from merge_graphs.io.refs import parse_model_ref

logger = logging.getLogger(__name__)

TAGS = ("merge", "merge-graphs")

#: Rows of the alignment table shown before the rest is summarized.
MAX_TABLE_ROWS = 20

_ALIGN_DESCRIPTIONS = {
    "none": "none: tensors were merged name by name without aligning hidden units (what mergekit does)",
    "weight": "weight matching (Git Re-Basin): the hidden units of every model were permuted to match the "
              "reference model's by maximizing the inner products of their weights, group by group",
    "activation": "activation matching: the hidden units of every model were permuted to match the reference "
                  "model's by correlating their activations on calibration inputs",
    "gnn": "neural-graph matching: hidden units were matched through embeddings of the models' neural graphs, "
           "then refined by weight matching",
}


def _hub_ids(base_models: Iterable[str]) -> list[str]:
    """The Hub ids (revision dropped, duplicates removed) among model references; local folders are left out."""
    ids: list[str] = []
    for ref in base_models:
        try:
            parsed = parse_model_ref(str(ref))
        except Exception:  # noqa: BLE001 - neither a folder nor a Hub id: not metadata
            parsed = None
        if parsed is None or parsed.repo_id is None:
            logger.debug("model card: %r is not a Hub id; listed in the text only", ref)
            continue
        if parsed.repo_id not in ids:
            ids.append(parsed.repo_id)
    return ids


def _fmt(value: Any) -> str:
    """A table cell: numbers with 4 significant digits, NaN as 'n/a', '|' escaped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _code(value: Any) -> str:
    text = str(value).replace("`", "'")
    return f"`{text}`"


def _alignment_section(summary: Mapping[str, Mapping[str, float]], max_rows: int) -> list[str]:
    columns: list[str] = [c for c in ("before", "after") if any(c in v for v in summary.values())]
    for values in summary.values():
        columns += [k for k in values if k not in columns]
    with_change = "before" in columns and "after" in columns
    header = ["group", *(f"objective {c}" if c in ("before", "after") else c for c in columns)]
    if with_change:
        header.append("change")
    rows = []
    for group, values in summary.items():
        row: list[Any] = [group, *(_number(values.get(c)) for c in columns)]
        if with_change:
            row.append(_number(values.get("after")) - _number(values.get("before")))
        rows.append(row)
    lines = [
        "## Alignment",
        "",
        ("The matching objective of every group of interchangeable hidden units (the similarity between the "
         "reference model and the aligned model; higher is better) before and after alignment."),
        "",
    ]
    shown = rows[:max_rows]
    if len(rows) > max_rows:
        shown.append([f"... {len(rows) - max_rows} more groups", *([""] * (len(header) - 1))])
    if len(rows) > 1:
        totals: list[Any] = [f"**total ({len(rows)} groups)**"]
        for i in range(1, len(header)):
            values = [r[i] for r in rows]
            totals.append(math.fsum(values) if all(isinstance(v, float) for v in values) else "")
        shown.append(totals)
    return lines + _table(header, shown) + [""]


def _scores_section(scores: Mapping[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    if scores and all(isinstance(v, Mapping) for v in scores.values()):
        metrics: list[str] = []
        for values in scores.values():
            metrics += [k for k in values if k not in metrics]
        lines += _table(["model", *metrics], ([name, *(values.get(m) for m in metrics)]
                                              for name, values in scores.items()))
    else:
        lines += _table(["model", "score"], ([name, value if not isinstance(value, Mapping) else dict(value)]
                                             for name, value in scores.items()))
    return lines + [""]


def _fenced(text: str, lang: str) -> list[str]:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{lang}", text.rstrip("\n"), fence]


def model_card(
    *,
    base_models: Sequence[str],
    merge_method: str,
    align_method: str,
    parameters: Mapping[str, Any],
    alignment_summary: Mapping[str, Mapping[str, float]] | None,
    recipe_yaml: str,
    scores: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    title: str | None = None,
    max_rows: int = MAX_TABLE_ROWS,
) -> str:
    """The ``README.md`` of a merged model: YAML metadata for the Hub, then a plain-markdown body.

    Metadata: ``base_model`` (the Hub ids among ``base_models``, ``@revision`` dropped; local
    folders appear in the text only), ``base_model_relation: merge``, ``tags: [merge,
    merge-graphs]``, ``library_name: transformers``. Body: the merged models, the alignment and
    merge methods with the merge parameters, a table of the per-group matching objective before
    and after alignment (the first ``max_rows`` groups, then a count of the rest and a total
    line), evaluation scores, notes, and the recipe as run in a ``yaml`` block.

    Args:
        base_models: the merged models' references, reference model first.
        merge_method: e.g. ``"linear"``, ``"ties"``.
        align_method: ``"none"``, ``"weight"``, ``"activation"``, ``"gnn"`` (others shown as is).
        parameters: the merge parameters (``{"weight": 0.5}``); nested values are shown inline.
        alignment_summary: ``{group: {"before": x, "after": y}}`` (``Alignment.summary()``; other
            keys become extra columns), or None to leave the table out.
        recipe_yaml: the recipe as run.
        scores: ``{model: score}`` or ``{model: {metric: score}}``, or None.
        notes: sentences listed under "Notes" (e.g. "the mergekit recipe ran without alignment").
        title: the card's heading; default: "Merge of <models>".
        max_rows: alignment table rows shown before summarizing.

    Example:
        >>> from huggingface_hub import ModelCard
        >>> from merge_graphs.io.card import model_card
        >>> text = model_card(base_models=["org/a", "org/b@v1"], merge_method="linear", align_method="weight",
        ...                   parameters={"weight": 0.5}, alignment_summary={"residual": {"before": 1.0, "after": 2.0}},
        ...                   recipe_yaml="merge:\\n  method: linear\\n")
        >>> data = ModelCard(text).data
        >>> data.base_model, data.tags, data.library_name
        (['org/a', 'org/b'], ['merge', 'merge-graphs'], 'transformers')
    """
    from huggingface_hub import ModelCardData

    base_models = [str(m) for m in base_models]
    hub_ids = _hub_ids(base_models)
    metadata: dict[str, Any] = {"library_name": "transformers", "tags": list(TAGS)}
    if hub_ids:
        metadata.update(base_model=hub_ids, base_model_relation="merge")
    data = ModelCardData(**metadata)

    if not title:
        short = [m.rstrip("/\\").replace("\\", "/").split("/")[-1].split("@")[0] or m for m in base_models]
        title = f"Merge of {', '.join(short)}" if 0 < len(short) <= 3 else f"Merge of {len(short)} models"
    lines = [f"# {title}", ""]
    lines += [
        (f"This model is a merge of {len(base_models)} model{'s' if len(base_models) != 1 else ''} made with "
         "merge-graphs, which aligns the hidden units of models before merging them, so that models trained "
         "from different initializations can be merged."),
        "",
        "## Merge details",
        "",
        "Models (the first is the reference the others were aligned to):",
        "",
    ]
    lines += [f"- {_code(m)}" for m in base_models]
    lines += [
        "",
        f"- Alignment: {_code(align_method)}: {_ALIGN_DESCRIPTIONS.get(align_method, align_method)}.",
        f"- Merge method: {_code(merge_method)}.",
    ]
    if parameters:
        lines.append("- Parameters:")
        lines += [f"  - {_code(k)}: {_code(v)}" for k, v in parameters.items()]
    else:
        lines.append("- Parameters: the method's defaults.")
    lines.append("")
    if alignment_summary:
        lines += _alignment_section(alignment_summary, max_rows)
    if scores:
        lines += _scores_section(scores)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Recipe", "", "The recipe as run:", "", *_fenced(recipe_yaml, "yaml"), ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
