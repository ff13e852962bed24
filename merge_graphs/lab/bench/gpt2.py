"""Suite ``gpt2``: different-seed byte-level GPT-2 language models.

    merge-graphs bench gpt2 [--pairs N] [--steps S] [--lr LR] [--quick] [--out DIR] [--jobs J]

One family of :mod:`merge_graphs.lab.bench.lm`, which runs every causal byte-level LM suite (``gpt2``,
``llama``); see its docstring. This module keeps the gpt2 names importable.
"""

from __future__ import annotations

from merge_graphs.lab.bench.lm import CALIBRATION, FAMILIES, WINDOWS, format_gpt2, gpt2_suite
from merge_graphs.lab.bench.lm import GPT2_METHODS as METHODS

#: ``--quick``'s steps, held-out windows and calibration windows.
QUICK = dict(FAMILIES["gpt2"].quick)

__all__ = ["CALIBRATION", "METHODS", "QUICK", "WINDOWS", "format_gpt2", "gpt2_suite"]
