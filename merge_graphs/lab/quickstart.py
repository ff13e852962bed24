"""The offline quickstart models: two tiny byte-level GPT-2 LMs trained here from different seeds.

``recipes/quickstart/`` ships two Hugging Face causal LMs, ``model-a`` (seed 0) and ``model-b``
(seed 1): the same data, architecture and hyperparameters, different initialization and batch
order, i.e. the pair merge-graphs exists for. Each folder holds a ``GPT2LMHeadModel``
(:data:`merge_graphs.lab.trainers.BYTE_GPT2`: 3 layers, width 80, 4 heads, context 128, 264k
parameters, safetensors in float32), a byte-level tokenizer that ``AutoTokenizer`` loads
offline (token id = UTF-8 byte, 256 = ``<|endoftext|>``) and ``training.json`` (how it was
made). ``heldout.txt`` is the evaluation text.

Data: the docstrings of a fixed list of Python standard-library modules
(:data:`merge_graphs.lab.trainers.DOCSTRING_TRAIN_MODULES`, about 0.7 MB), read with ``inspect`` in a
fresh interpreter (``python -I -S``, so that what the caller imported, e.g. transformers'
additions to ``logging.Logger``, cannot change it); the held-out text (about 45 KB) comes from other modules
(:data:`merge_graphs.lab.trainers.DOCSTRING_HELDOUT_MODULES`: difflib, textwrap, fractions,
statistics), without any docstring that also occurs in the training text. Python's docstrings
are distributed under the Python Software Foundation License, which allows redistribution of
the text and of works derived from it. Docstrings change between Python releases, so
regeneration reproduces the shipped files bit for bit only on the Python version (and torch
build) recorded in ``training.json``; :func:`generate` warns when the corpus differs.

Regenerate (about 2.5 minutes per model on one CPU core; ``--jobs 2`` trains both at once, with
the same result)::

    python -m merge_graphs.lab.quickstart --out recipes/quickstart --jobs 2

then it prints the held-out loss of both parents, of the naive average and of the aligned
averages, next to a unigram baseline (``--eval-only`` skips the training). For the shipped
pair (Python 3.11.7, torch 2.13.0+cpu; nats per byte over all 349 held-out windows)::

    merge                               midpoint   barrier
    model A / model B                   2.503 / 2.528
    naive average                       3.165      0.649
    weight matching (seed 0)            2.997      0.481
    weight matching, 5 visiting seeds   2.93-3.07  0.41-0.55
    weight matching, residual + MLP     2.93-2.97  0.42-0.46
    activation matching (64 x 128 B)    2.802      0.287
    unigram baseline (held-out entropy) 3.404

Example:
    >>> from merge_graphs.lab.quickstart import unigram_loss
    >>> round(unigram_loss("abab"), 4)  # two equally frequent bytes: log 2 nats
    0.6931
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_graphs.evaluate import text_loss
from merge_graphs.lab import trainers

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS", "TRAINING", "calibration_inputs", "compare", "generate", "heldout_loss", "load_pair", "main",
    "unigram_loss",
]

#: Folder name and seed of each shipped model.
MODELS = {"model-a": 0, "model-b": 1}

#: Training hyperparameters of the shipped models (see :func:`merge_graphs.lab.trainers.train_byte_gpt2`).
TRAINING = {"steps": 800, "batch_size": 32, "lr": 1e-3, "warmup": 100, "final_lr_fraction": 0.1, "weight_decay": 0.1,
            "grad_clip": 1.0}
# The learning rate decides how alignable the pair is. Measured here (same model, 800 steps,
# seeds 0 and 1, first 150 held-out windows; share of the naive midpoint barrier that weight
# matching removes, over 3 visiting seeds):
# lr 1e-3: held-out loss 2.54 / 2.55, weight matching removes 35-43 % (activation matching 61 %);
# lr 2e-3: 2.21 / 2.30, 8-21 % (22 %); lr 3e-3: 2.11 / 2.11, 1-7 % (25 %). Weight decay (0 or
# 0.1) made no difference, nor did 2 wider layers at 3e-3 (width 112: weight matching worse
# than naive; width 128 with MLP 256: 5-7 %). Better-trained parents are much harder to align by permutations
# alone, so the quickstart uses 1e-3: its parents are clearly language models and its point
# (aligned beats naive) is clear.

HELDOUT_FILE = "heldout.txt"
#: Training-text windows that learned alignment reads (``recipes/quickstart.yaml``).
CALIBRATION_FILE = "calibration.txt"
CALIBRATION_WINDOWS = 256
DEFAULT_OUT = os.path.join("recipes", "quickstart")
DEFAULT_HELDOUT = os.path.join(DEFAULT_OUT, HELDOUT_FILE)


class _Bytes:
    """A tokenizer stand-in: the UTF-8 bytes of the text are the token ids."""

    def __call__(self, text: str, verbose: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def _read(text_or_path: str | os.PathLike) -> str:
    """A file's text, or the argument itself when it is text rather than the name of a file."""
    if isinstance(text_or_path, os.PathLike):
        return Path(text_or_path).read_text(encoding="utf-8")
    try:
        is_file = "\n" not in text_or_path and len(text_or_path) < 4096 and Path(text_or_path).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte
        is_file = False
    return Path(text_or_path).read_text(encoding="utf-8") if is_file else text_or_path


def heldout_loss(
    model: nn.Module,
    tokenizer: Any = None,
    text_path: str | os.PathLike = DEFAULT_HELDOUT,
    *,
    window: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 32,
) -> float:
    """Mean next-token cross-entropy (nats per token) of a causal LM on held-out text.

    The text (a file, or the text itself) is tokenized once (with ``tokenizer``, or as UTF-8
    bytes when it is None, which is the same for the quickstart models) and cut into
    consecutive, non-overlapping windows of ``window`` tokens (default: the model's context, at
    most 128); the remainder is dropped. Every predicted token of the first ``max_windows``
    windows (all by default) counts once, so the figure is deterministic. (The same
    definition as :func:`merge_graphs.evaluate.text_loss`, which it calls.)

    Example:
        >>> from merge_graphs.lab.trainers import make_byte_gpt2
        >>> model = make_byte_gpt2(0, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        >>> round(heldout_loss(model, None, "hello world " * 20), 1)  # untrained: about log(257)
        5.5
    """
    return text_loss(model, tokenizer or _Bytes(), _read(text_path), window=window, max_windows=max_windows,
                     batch_size=batch_size)


def unigram_loss(text_path: str | os.PathLike, fit_text: str | os.PathLike | None = None) -> float:
    """Cross-entropy (nats per byte) of a byte unigram model on a text: the baseline an LM must beat.

    With ``fit_text`` the byte frequencies are fitted on it (add-one smoothed over 256 bytes);
    without, on the evaluated text itself, which gives its byte entropy: the lowest
    cross-entropy any unigram model can reach on it.
    """
    data = _read(text_path).encode("utf-8")
    if fit_text is None:
        counts = Counter(data)
        return -sum(c / len(data) * math.log(c / len(data)) for c in counts.values())
    fit = Counter(_read(fit_text).encode("utf-8"))
    total = sum(fit.values()) + 256
    return -sum(math.log((fit[b] + 1) / total) for b in data) / len(data)


def calibration_inputs(text: str | bytes, n: int = 64, seq_len: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"input_ids": (n, seq_len)}``: byte windows at random (seeded) offsets of a held-in text.

    Example:
        >>> calibration_inputs("abcdefgh" * 4, n=2, seq_len=5)["input_ids"].shape
        torch.Size([2, 5])
    """
    data = torch.tensor(list(text.encode("utf-8") if isinstance(text, str) else text), dtype=torch.long)
    starts = torch.randint(0, len(data) - seq_len + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": data[starts[:, None] + torch.arange(seq_len)]}


def calibration_text(text: str, n: int = CALIBRATION_WINDOWS, seq_len: int = 128, seed: int = 0) -> str:
    """The windows of :func:`calibration_inputs` written one after another as text: the quickstart's
    calibration file, which a recipe reads back as windows (``split: windows``).

    Example:
        >>> calibration_text("abcdefgh" * 4, n=2, seq_len=5)
        'efghadefgh'
    """
    windows = calibration_inputs(text, n, seq_len, seed)["input_ids"]
    return bytes(windows.reshape(-1).tolist()).decode("utf-8", errors="ignore")


def load_pair(folder: str | os.PathLike = DEFAULT_OUT) -> tuple[nn.Module, nn.Module, Any]:
    """The shipped ``(model_a, model_b, tokenizer)``, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    a = AutoModelForCausalLM.from_pretrained(folder / "model-a").eval()
    b = AutoModelForCausalLM.from_pretrained(folder / "model-b").eval()
    return a, b, AutoTokenizer.from_pretrained(folder / "model-a")


def _train_and_save(seed: int, folder: str, train_text: str, heldout_path: str, record: dict) -> float:
    """Train one model and write its folder; returns the training time in seconds."""
    start = time.perf_counter()
    model = trainers.train_byte_gpt2(train_text, seed, **TRAINING)
    seconds = time.perf_counter() - start
    tokenizer = trainers.byte_tokenizer(model.config.n_positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_config(folder)
    record = dict(record, seed=seed, heldout_loss=round(heldout_loss(model, None, heldout_path), 6))
    Path(folder, "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (seed %d, trained in %.1f s)", folder, seed, seconds)
    return seconds


def _portable_tokenizer_config(folder: str) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (transformers 4 knows it; 5 maps it
    to its tokenizers backend) rather than transformers 5's ``TokenizersBackend``."""
    path = Path(folder, "tokenizer_config.json")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def generate(out: str | os.PathLike = DEFAULT_OUT, *, jobs: int = 1) -> dict[str, float]:
    """Write ``heldout.txt``, ``calibration.txt``, ``model-a/`` and ``model-b/`` into ``out``; returns training seconds per model.

    Deterministic on one Python version and torch build (the corpus comes from the running
    interpreter's docstrings; training runs on one thread). ``jobs=2`` trains the two models in
    two processes at once, with the same results.
    """
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_text = trainers.load_docstring_corpus("train")
    heldout_text = trainers.load_docstring_corpus("heldout")
    heldout_path = out / HELDOUT_FILE
    if heldout_path.exists() and heldout_path.read_text(encoding="utf-8") != heldout_text:
        warnings.warn(f"{heldout_path} differs from this Python's held-out docstrings (Python {platform.python_version()}); "
                      "overwriting it", stacklevel=2)
    heldout_path.write_text(heldout_text, encoding="utf-8")
    (out / CALIBRATION_FILE).write_text(calibration_text(train_text), encoding="utf-8")
    previous = out / "model-a" / "training.json"
    sha = trainers.docstring_corpus_sha256(train_text)
    if previous.exists():
        old = json.loads(previous.read_text(encoding="utf-8")).get("corpus", {}).get("train_sha256")
        if old and old != sha:
            warnings.warn("this Python's training docstrings differ from those the shipped models were trained on "
                          f"(recorded in {previous}); the regenerated models will differ", stacklevel=2)
    record = {
        "architecture": "GPT2LMHeadModel",
        "config": dict(trainers.BYTE_GPT2, vocab_size=trainers.BYTE_VOCAB_SIZE),
        "training": dict(TRAINING, seq_len=trainers.BYTE_GPT2["n_positions"], optimizer="AdamW(0.9, 0.95)",
                         schedule="linear warmup, cosine decay", threads=1),
        "corpus": {
            "source": "docstrings of Python standard-library modules (PSF license), "
                      "merge_graphs.lab.trainers.load_docstring_corpus",
            "train_modules": list(trainers.DOCSTRING_TRAIN_MODULES),
            "heldout_modules": list(trainers.DOCSTRING_HELDOUT_MODULES),
            "train_bytes": len(train_text.encode("utf-8")),
            "train_sha256": sha,
            "heldout_bytes": len(heldout_text.encode("utf-8")),
            "heldout_sha256": trainers.docstring_corpus_sha256(heldout_text),
        },
        "made_with": {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "command": "python -m merge_graphs.lab.quickstart"},
    }
    tasks = [(seed, str(out / name), train_text, str(heldout_path), record) for name, seed in MODELS.items()]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds = list(pool.map(_train_and_save, *zip(*tasks)))
    else:
        seconds = [_train_and_save(*t) for t in tasks]
    return dict(zip(MODELS, seconds))


def _residual_and_mlp(spec) -> list[str]:
    return [g for g, grp in spec.groups.items() if grp.parent is None and (g == "residual" or g.endswith(".mlp"))]


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    heldout_path: str | os.PathLike,
    calibration: Mapping[str, torch.Tensor],
    *,
    seeds: Sequence[int] = (0,),
    barrier: bool = True,
) -> dict[str, dict[str, float]]:
    """Held-out loss of both parents and of their average, naive and aligned, with alignment times.

    Rows: ``A``, ``B``, ``naive`` (``merge_models(..., align="none")``), ``weight`` (weight
    matching of every group), ``weight (residual+mlp)`` (attention heads left in place),
    ``activation`` (activation matching on ``calibration``). For the aligned rows, one entry
    per weight-matching ``seed`` (visiting order). Each row: ``loss`` (of the midpoint merge),
    ``align_s`` (seconds to align), and with ``barrier`` the loss ``barrier`` over 11
    interpolation points.
    """
    import merge_graphs as mg
    from merge_graphs.evaluate import interpolation_curve

    def loss(m):
        return heldout_loss(m, None, heldout_path)

    rows: dict[str, dict[str, float]] = {"A": {"loss": loss(model_a)}, "B": {"loss": loss(model_b)}}
    spec = mg.symmetry_spec(model_a)
    variants = [("naive", "none", None, 0)]
    for s in seeds:
        suffix = "" if len(seeds) == 1 else f" seed {s}"
        variants += [(f"weight{suffix}", "weight", None, s),
                     (f"weight (residual+mlp){suffix}", "weight", _residual_and_mlp(spec), s)]
    variants.append(("activation", "activation", None, 0))
    for label, method, groups, seed in variants:
        start = time.perf_counter()
        alignment = mg.align(model_a, model_b, method, groups=groups, seed=seed,
                             calibration=calibration if method == "activation" else None)
        seconds = time.perf_counter() - start
        aligned_b = mg.permute(model_b, alignment.permutations, spec)
        merged = mg.merge_models([model_a, aligned_b], method="linear", align="none")
        row = {"loss": loss(merged), "align_s": seconds}
        if barrier:
            row["barrier"] = interpolation_curve(model_a, aligned_b, loss, points=11).barrier
        rows[label] = row
    return rows


def _report(rows: Mapping[str, Mapping[str, float]], baselines: Mapping[str, float]) -> str:
    lines = [f"{'held-out loss (nats/byte)':32s} {'midpoint':>9s} {'barrier':>8s} {'align s':>8s}"]
    for label, row in rows.items():
        lines.append(f"{label:32s} {row['loss']:9.4f} " + (f"{row['barrier']:8.4f} " if "barrier" in row else " " * 9)
                     + (f"{row['align_s']:8.2f}" if "align_s" in row else ""))
    for label, value in baselines.items():
        lines.append(f"{label:32s} {value:9.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_graphs.lab.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="train the two models in this many processes")
    parser.add_argument("--eval-only", action="store_true", help="do not train; evaluate the models in --out")
    parser.add_argument("--no-eval", action="store_true", help="train and write, but do not compare merges")
    parser.add_argument("--restarts", type=int, default=1, help="weight-matching seeds to report (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.eval_only:
        for name, seconds in generate(args.out, jobs=args.jobs).items():
            print(f"trained {name} in {seconds:.1f} s")
    if args.no_eval:
        return 0
    a, b, _ = load_pair(args.out)
    heldout = Path(args.out) / HELDOUT_FILE
    train_text = trainers.load_docstring_corpus("train")
    rows = compare(a, b, heldout, calibration_inputs(train_text, seq_len=a.config.n_positions),
                   seeds=range(args.restarts))
    baselines = {"unigram (fit on training text)": unigram_loss(heldout, train_text),
                 "unigram (held-out entropy)": unigram_loss(heldout)}
    print(_report(rows, baselines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
