"""The model zoo the GNN is pretrained on: small models of every family, trained on CPU.

Digits MLPs of several widths, depths and activations, and tiny byte-level BERT (masked LM),
GPT-2 and Llama models on the standard-library docstring corpus, each from several seeds.
Every model is deterministic given its entry (architecture, training, seed): it is trained
by the trainers of :mod:`merge_graphs.lab.trainers` on one CPU thread, saved as safetensors plus a
metadata json in a cache folder, and loaded from there while the metadata matches.

Seeds listed in an architecture's ``heldout`` are never trained on: the benchmark measures
on them (a permuted copy of one, and independent pairs of two). Its ``validation`` seeds are
never trained on either: pretraining keeps the encoder that matches their pairs best (early
stopping), so the benchmark's pairs play no part in choosing the weights.

Version 1 (the shipped encoder's first zoo): the 4 MLPs and GPT-2, Llama and BERT of width 32.
Version 2 keeps those models as they were (same seeds, same cache entries) and adds validation
seeds to them, and per LM family width 64, a second learning rate and (GPT-2, Llama) a 3x longer
schedule, each from seeds of its own, and width 128 for validation and held-out pairs only.

Example:
    >>> from merge_graphs.lab.pretraining_zoo import zoo_entries
    >>> entries = zoo_entries()
    >>> sorted({e.family for e in entries})
    ['bert', 'gpt2', 'llama', 'mlp']
    >>> all(e.heldout == (e.seed in e.arch.heldout) for e in entries)
    True
    >>> sorted({e.split for e in entries})
    ['heldout', 'train', 'validation']
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from merge_graphs.lab import trainers

logger = logging.getLogger(__name__)

ZOO_VERSION = 2
DEFAULT_CACHE = Path("out/zoo")
WINDOW = 32  # bytes per LM training / evaluation window
MASK_ID = trainers.BYTE_VOCAB_SIZE  # BERT's [MASK]: one id past the byte vocabulary


@dataclass(frozen=True)
class Arch:
    """One architecture and training recipe of the zoo, trained from each of ``seeds``: ``heldout``
    seeds only for the benchmark, ``validation`` seeds only for pretraining's early stopping, the
    rest for pretraining. ``since`` is the zoo version that added it (its models' cache key)."""

    name: str
    family: str
    config: dict
    training: dict
    seeds: tuple[int, ...]
    heldout: tuple[int, ...]
    validation: tuple[int, ...] = ()
    since: int = 1


_LM = {"steps": 600, "batch_size": 16, "seq_len": WINDOW, "lr": 3e-3, "warmup": 30}
_BERT = {**_LM, "lr": 2e-3}


def _config(family: str, width: int) -> dict:
    """A 2-layer byte-level LM of ``family`` and residual width ``width`` (4 heads; Llama's and BERT's MLP
    2 x width, GPT-2's its default 4 x width)."""
    if family == "gpt2":
        return {"n_embd": width, "n_layer": 2, "n_head": 4, "n_positions": WINDOW}
    common = {"hidden_size": width, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * width,
              "max_position_embeddings": WINDOW}
    return {**common, "num_key_value_heads": 2} if family == "llama" else common


def _variants(family: str, training: dict) -> tuple[Arch, ...]:
    """Version 2's archs of one LM family: width 64, a second learning rate, (GPT-2, Llama) a 3x longer
    schedule, and width 128 with validation and held-out seeds only (a width pretraining never sees, which
    keeps pretraining's steps cheap). Each uses seeds no other arch of its config uses,
    so that no training model shares its initialization with a held-out or validation model."""
    def arch(name, config, recipe, first, train=3):
        seeds = tuple(range(first, first + train + 4))
        return Arch(name, family, config, recipe, seeds, seeds[train:train + 2], seeds[train + 2:], since=2)

    out = [arch(f"{family}-64", _config(family, 64), training, 10),
           arch(f"{family}-128", _config(family, 128), training, 13, train=0),
           arch(f"{family}-32-lr1e-3", _config(family, 32), {**training, "lr": 1e-3}, 20)]
    if family != "bert":
        out.append(arch(f"{family}-32-long", _config(family, 32), {**training, "steps": 1800}, 30))
    return tuple(out)


ARCHS = (
    Arch("mlp-32", "mlp", {"widths": (64, 32, 10), "activation": "relu"}, {"epochs": 10}, tuple(range(8)), (4, 5),
         (6, 7)),
    Arch("mlp-64x2", "mlp", {"widths": (64, 64, 64, 10), "activation": "relu"}, {"epochs": 10}, tuple(range(8)),
         (4, 5), (6, 7)),
    Arch("mlp-128x2-gelu", "mlp", {"widths": (64, 128, 128, 10), "activation": "gelu"}, {"epochs": 10, "lr": 3e-3},
         tuple(range(8)), (4, 5), (6, 7)),
    Arch("mlp-48x3-tanh", "mlp", {"widths": (64, 48, 48, 48, 10), "activation": "tanh"}, {"epochs": 10},
         tuple(range(8)), (4, 5), (6, 7)),
    Arch("gpt2-32", "gpt2", _config("gpt2", 32), _LM, tuple(range(7)), (3, 4), (5, 6)),
    Arch("llama-32", "llama", _config("llama", 32), _LM, tuple(range(7)), (3, 4), (5, 6)),
    Arch("bert-32", "bert", _config("bert", 32), _BERT, tuple(range(7)), (3, 4), (5, 6)),
    *_variants("gpt2", _LM),
    *_variants("llama", _LM),
    *_variants("bert", _BERT),
)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: an architecture and a seed."""

    arch: Arch
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch.name}-s{self.seed}"

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def heldout(self) -> bool:
        return self.seed in self.arch.heldout

    @property
    def split(self) -> str:
        """``"heldout"``, ``"validation"`` or ``"train"``."""
        return "heldout" if self.heldout else "validation" if self.seed in self.arch.validation else "train"

    def metadata(self) -> dict:
        """What determines the weights; a cached model is reused only while this matches (a version-1
        model's metadata is what version 1 wrote, so its cache stays valid)."""
        arch = {k: v for k, v in asdict(self.arch).items() if k not in ("validation", "since")}
        return {"zoo_version": self.arch.since, "arch": arch | {"seeds": None, "heldout": None},
                "seed": self.seed, "torch": torch.__version__.split("+")[0]}


@dataclass
class ZooModel:
    """A trained zoo model and its entry."""

    entry: ZooEntry
    model: nn.Module = field(repr=False)


def archs_of(version: int = ZOO_VERSION) -> tuple[Arch, ...]:
    """The architectures of zoo version ``version`` (version 1: the 4 MLPs and the width-32 LMs)."""
    return tuple(a for a in ARCHS if a.since <= version)


def zoo_entries(archs: Iterable[Arch] = ARCHS, *, split: str | None = None) -> list[ZooEntry]:
    """Every (architecture, seed) of the zoo; with ``split``, only its ``"train"``, ``"validation"``
    or ``"heldout"`` seeds."""
    out = [ZooEntry(a, s) for a in archs for s in a.seeds]
    return out if split is None else [e for e in out if e.split == split]


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def corpus_text(split: str) -> bytes:
    """The docstring corpus (``"train"`` or ``"heldout"``) as UTF-8 bytes, read once per process
    (reading it starts a fresh interpreter)."""
    return trainers.load_docstring_corpus(split).encode("utf-8")


def corpus_bytes(split: str) -> torch.Tensor:
    """The docstring corpus as a 1-D tensor of byte ids."""
    return torch.frombuffer(bytearray(corpus_text(split)), dtype=torch.uint8).long()


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits split every zoo MLP is trained on."""
    return trainers.load_digits_split(0)


def lm_windows(split: str, n: int, seed: int = 0) -> torch.Tensor:
    """``(n, WINDOW)`` byte windows of the corpus at random offsets fixed by ``seed``."""
    data = corpus_bytes(split)
    starts = torch.randint(0, len(data) - WINDOW, (n,), generator=torch.Generator().manual_seed(seed))
    return data[starts[:, None] + torch.arange(WINDOW)]


# --------------------------------------------------------------------------- models


def build(entry: ZooEntry) -> nn.Module:
    """The untrained model of an entry, initialized from its seed."""
    arch = entry.arch
    if arch.family == "mlp":
        return trainers.make_mlp(arch.config["widths"], arch.config["activation"], seed=entry.seed)
    if arch.family == "gpt2":
        return trainers.make_byte_gpt2(entry.seed, **arch.config)
    import transformers as T

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        if arch.family == "llama":
            cfg = T.LlamaConfig(vocab_size=trainers.BYTE_VOCAB_SIZE, bos_token_id=256, eos_token_id=256,
                                pad_token_id=None, **arch.config)
            return T.LlamaForCausalLM(cfg).eval()
        if arch.family == "bert":
            cfg = T.BertConfig(vocab_size=MASK_ID + 1, pad_token_id=0, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, type_vocab_size=1, **arch.config)
            return T.BertForMaskedLM(cfg).eval()
    raise ValueError(f"unknown zoo family {arch.family!r}")


def train(entry: ZooEntry, model: nn.Module | None = None, **overrides) -> nn.Module:
    """Train an entry's model (fresh from its seed unless ``model`` is given) with its recipe;
    ``overrides`` change the recipe (a few more steps for a perturbed copy)."""
    model = model if model is not None else build(entry)
    training = {**entry.arch.training, **overrides}
    seed = training.pop("seed", entry.seed)
    if entry.family == "mlp":
        x, y, _, _ = digits()
        n = training.pop("samples", len(x))
        return trainers.train_classifier(model, x[:n], y[:n], seed=seed, **training)
    masked = entry.family == "bert"
    return trainers.train_byte_lm(model, corpus_text("train"), seed, masked=masked, mask_id=MASK_ID, **training)


def further_training(entry: ZooEntry, model: nn.Module, seed: int, steps: int = 5) -> nn.Module:
    """``model`` (a copy, trained in place) after a few more steps on its own data: a perturbation
    that moves weights the way training does, not isotropically."""
    if entry.family == "mlp":
        return train(entry, model, seed=seed, epochs=1, samples=64 * steps, lr=3e-4)
    return train(entry, model, seed=seed, steps=steps, warmup=1, lr=3e-4, final_lr_fraction=1.0)


def loss_fn(entry: ZooEntry, split: str = "heldout") -> Callable[[nn.Module], float]:
    """The loss of an entry's models on ``split``: digits cross-entropy (test set for
    ``"heldout"``), or the LM loss on 64 windows of the docstrings (BERT: a fixed 15% of bytes
    masked). Pseudo-labels pick their teacher on ``"train"``; benchmarks report ``"heldout"``."""
    if entry.family == "mlp":
        from merge_graphs.evaluate import cross_entropy

        x_tr, y_tr, x, y = digits()
        x, y = (x, y) if split == "heldout" else (x_tr[:512], y_tr[:512])
        return lambda m: cross_entropy(m, x, y)
    batch = lm_windows(split, 64, seed=2)
    if entry.family != "bert":
        inputs, labels = batch, batch
    else:
        hide = torch.rand(batch.shape, generator=torch.Generator().manual_seed(0)) < 0.15
        inputs, labels = batch.masked_fill(hide, MASK_ID), batch.masked_fill(~hide, -100)

    def lm_loss(model: nn.Module) -> float:
        with torch.no_grad():
            device = next(model.parameters()).device
            return float(model(input_ids=inputs.to(device), labels=labels.to(device)).loss)

    return lm_loss


def calibration(entry: ZooEntry, n: int = 64) -> dict[str, torch.Tensor]:
    """Inputs for activation matching (training data, never the held-out text)."""
    if entry.family == "mlp":
        return {"input": digits()[0][:256]}
    return {"input_ids": lm_windows("train", n, seed=1)}


def learning_inputs(entry: ZooEntry, n: int = 512) -> dict[str, torch.Tensor]:
    """Training inputs for learned permutations (:func:`merge_graphs.learned.learned_permutations`) on an
    entry's own loss: digits with their labels, or byte windows (the masked-LM loss masks them itself).
    Disjoint from the training inputs :func:`loss_fn` scores (digits 512 on; windows of another seed)."""
    if entry.family == "mlp":
        x, y, _, _ = digits()
        return {"input": x[512:512 + n], "labels": y[512:512 + n]}
    return {"input_ids": lm_windows("train", n, seed=3)}


def load_model(entry: ZooEntry, cache: str | os.PathLike = DEFAULT_CACHE) -> nn.Module:
    """An entry's trained model, from ``cache`` if its metadata matches, else trained and saved."""
    from safetensors.torch import load_file, save_file

    folder = Path(cache)
    weights, meta = folder / f"{entry.name}.safetensors", folder / f"{entry.name}.json"
    model = build(entry)
    fresh = weights.is_file() and meta.is_file()
    if fresh and json.loads(meta.read_text()).get("entry") == _jsonable(entry.metadata()):
        model.load_state_dict(load_file(weights))
        return model.eval()
    model = train(entry, model)
    folder.mkdir(parents=True, exist_ok=True)
    # Clones: tied tensors (an LM head stored as the embedding) would otherwise share memory.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, weights)
    meta.write_text(json.dumps({"entry": _jsonable(entry.metadata()), "heldout_loss": loss_fn(entry)(model)}, indent=1))
    return model


def load_zoo(
    entries: Iterable[ZooEntry] | None = None, cache: str | os.PathLike = DEFAULT_CACHE, *, progress: bool = False
) -> list[ZooModel]:
    """Trained models of ``entries`` (default: the whole zoo), trained on first use (a few minutes)."""
    entries = list(entries) if entries is not None else zoo_entries()
    return [ZooModel(e, load_model(e, cache)) for e in tqdm(entries, desc="zoo", disable=not progress)]


def _jsonable(x):
    return json.loads(json.dumps(x))
