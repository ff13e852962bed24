"""Calibration text sampled from the models being merged: learned alignment without a data set.

Learned alignment (:mod:`merge_graphs.learned`) needs token sequences to run the interpolated models
on, but nothing says they must come from a corpus: the parents themselves are generative models of
the text they were trained on. :func:`sample_calibration` draws sequences from each causal LM in
turn (ancestral sampling at temperature 1 from the model's start token, with a key-value cache),
so a merge needs no data beyond the two checkpoints. On the bench's different-seed pairs this
recovers most of what real text gives (``merge-graphs bench gpt2`` / ``bench llama``, the
``learned, sampled text`` rows).

The end-of-text token is never sampled after the start, so every sequence is a full window and no
padding is needed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from merge_graphs.errors import AlignmentError

logger = logging.getLogger(__name__)

__all__ = ["sample_calibration"]


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _start_token(model: nn.Module) -> tuple[int, frozenset[int]]:
    """The token every sequence starts from (bos, else eos) and the end-of-text ids never sampled."""
    config = model.config
    bos, eos = _first_id(getattr(config, "bos_token_id", None)), getattr(config, "eos_token_id", None)
    ends = frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    start = bos if bos is not None else _first_id(eos)
    if start is None:
        raise AlignmentError(f"{type(model).__name__} declares neither bos_token_id nor eos_token_id, so there is no "
                             "token to start sampling from; set one in its config or give calibration texts")
    return start, ends


def _max_length(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _cache_argument(model: nn.Module) -> str:
    """The name under which ``forward`` takes (and its output returns) the key-value cache: ``cache`` since
    transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _sample(model: nn.Module, n: int, length: int, start: int, ends: frozenset[int], temperature: float,
            generator: torch.Generator) -> torch.Tensor:
    device = next(model.parameters()).device
    cache = _cache_argument(model)
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    for _ in range(length - 1):
        logits = out.logits[:, -1].float() / temperature
        logits[:, sorted(ends)] = -torch.inf
        token = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, token], 1)
        out = model(input_ids=token, use_cache=True, **{cache: getattr(out, cache)})
    return ids.cpu()


def sample_calibration(
    models: Sequence[nn.Module],
    samples: int = 4096,
    length: int = 128,
    *,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``samples`` token sequences of ``length`` drawn from the causal LMs ``models``, in equal shares.

    Args:
        models: causal LMs with one tokenizer (e.g. the two parents of a merge).
        samples: sequences in all; model ``i`` draws every ``len(models)``-th one.
        length: tokens a sequence, the start token included (at most the models' context).
        temperature: the softmax temperature of sampling (1: the models' own distribution).
        batch_size: sequences sampled at once.
        seed: seeds the draws (the result is deterministic).
        progress: show a progress bar.

    Returns:
        ``{"input_ids": (samples, length), "attention_mask": ones}``: calibration for
        :func:`merge_graphs.align` (``"learned"``, ``"activation"``).

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=24, bos_token_id=1, eos_token_id=2)
        >>> a, b = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
        >>> ids = sample_calibration([a, b], samples=4, length=6)["input_ids"]
        >>> ids.shape, bool((ids[:, 0] == 1).all()), bool((ids[:, 1:] != 2).all())
        (torch.Size([4, 6]), True, True)
    """
    if not models:
        raise AlignmentError("sample_calibration needs at least one model")
    for model in models:
        if not getattr(model, "can_generate", lambda: False)():
            raise AlignmentError(f"{type(model).__name__} does not generate text (not a causal LM): sampled "
                                 "calibration needs causal LMs; give calibration texts instead")
    if samples < 1 or length < 2 or batch_size < 1 or not temperature > 0:
        raise AlignmentError(f"samples and batch_size must be at least 1, length at least 2 and temperature positive; "
                             f"got samples={samples}, length={length}, batch_size={batch_size}, "
                             f"temperature={temperature}")
    context = min((m for m in map(_max_length, models) if m is not None), default=None)
    if context is not None and length > context:
        raise AlignmentError(f"length {length} exceeds the models' context of {context} tokens; sample shorter "
                             "sequences")
    starts = {_start_token(m) for m in models}
    if len(starts) > 1:
        raise AlignmentError("the models declare different start or end-of-text tokens: they do not share a "
                             "tokenizer, and sampled text from one would not be text to the other")
    start, ends = next(iter(starts))
    generator = torch.Generator().manual_seed(seed)
    shares = [len(range(i, samples, len(models))) for i in range(len(models))]
    chunks = [(i, min(batch_size, share - done)) for i, share in enumerate(shares)
              for done in range(0, share, batch_size)]
    drawn: list[list[torch.Tensor]] = [[] for _ in models]
    for i, n in tqdm(chunks, desc="sampling calibration", disable=not progress):
        model = models[i]
        was_training = model.training
        model.eval()
        drawn[i].append(_sample(model, n, length, start, ends, temperature, generator))
        model.train(was_training)
    per_model = [torch.cat(d) for d in drawn if d]
    # Interleave so that any prefix of the result holds every model's share.
    ids = torch.stack([per_model[i % len(per_model)][i // len(per_model)] for i in range(samples)])
    logger.info("sampled %d calibration sequences of %d tokens from %d models", samples, length, len(models))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
