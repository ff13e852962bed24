"""One output vocabulary for a merge: mergekit's ``tokenizer_source`` and ``tokenizer`` section.

When a recipe names where the output's tokenizer comes from (``base``, ``union`` or a model),
mergekit builds that tokenizer, then moves every model's token-indexed tensors (the input
embeddings and the LM head) onto its vocabulary before merging: row ``j`` of each model's
tensor becomes the row of output token ``j`` in that model. A token some model lacks gets a
stand-in row in that model (:meth:`Vocabulary.remap`): the one model's row that has it, the
base's, the average of those that have it, or what the ``tokens`` section says. The output's
token-indexed tensors have as many rows as the tokenizer has tokens (rounded up to
``pad_to_multiple_of``, the padding rows being each model's mean row), and its config says so.

Everything here is data in, data out: tokenizers and vocabularies in, row indices and tensors
out; :mod:`merge_graphs.run` reads the tokenizers and the engine calls :meth:`Vocabulary.remap`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEmbedding:
    """Where one token's row comes from (an entry of mergekit's ``tokenizer.tokens``).

    Attributes:
        source: a model reference (that model's row of the token), ``"zero"`` (a zero row), or
            None (the default rule).
        token, token_id: with a model ``source``, take that model's row of this other token
            (by text or by id) instead.
        force: use this row in every model, even those that have the token.
    """

    source: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class Vocabulary:
    """The output vocabulary and, per model, where each output token's row is.

    Attributes:
        tokenizer: the output's tokenizer (written to the output folder).
        tokens: the output vocabulary, ``{token: id}``.
        size: rows of the output's token-indexed tensors (``len(tokens)``, padded).
        rows: per model reference, its row of every output token (``-1``: the model lacks it).
        original: per model reference, its own vocabulary (for ``TokenEmbedding.token``).
        configured: the ``tokens`` section.
        axes: the output's token-indexed tensors and their vocabulary axis (:func:`token_indexed`).
        owners: ``{id(tensor source): model reference}``: which model a source of the merge is.
        base: the recipe's base model, whose row stands in for a token some models lack
            (whatever the merge method does with it).
    """

    tokenizer: Any
    tokens: dict[str, int]
    size: int
    rows: dict[str, torch.Tensor]
    original: dict[str, dict[str, int]]
    configured: dict[str, TokenEmbedding] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    base: str | None = None

    def moves(self, ref: str, stored_rows: int) -> bool:
        """Whether model ``ref``'s token-indexed tensors (``stored_rows`` rows) change."""
        rows = self.rows[ref]
        return bool(self.configured) or self.size != stored_rows or not torch.equal(rows, torch.arange(len(rows)))

    def remap(self, tensors: Sequence[torch.Tensor], refs: Sequence[str], axis: int = 0,
              base: str | None = None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Every model's token-indexed tensor moved onto the output vocabulary (mergekit's
        ``PermutedVocabulary``).

        Args:
            tensors: one tensor per model, token rows on ``axis``; the other axes agree.
            refs: the model of each tensor, in mergekit's order (the recipe's models, then the base).
            base: the base model, whose row stands in for a token that some models lack.
            dtype: stand-in rows are computed in it (mergekit's recipe ``dtype``), as mergekit does.

        Example:
            >>> import torch
            >>> v = Vocabulary(None, {"a": 0, "b": 1, "c": 2}, 3,
            ...                rows={"x": torch.tensor([0, 1, -1]), "y": torch.tensor([1, -1, 0])}, original={})
            >>> x, y = v.remap([torch.tensor([[1.], [2.]]), torch.tensor([[30.], [10.]])], ["x", "y"])
            >>> x.flatten().tolist(), y.flatten().tolist()
            ([1.0, 2.0, 30.0], [10.0, 2.0, 30.0])
        """
        views = [t.movedim(axis, 0) for t in tensors]
        if any(v.shape[1:] != views[0].shape[1:] for v in views):
            raise ValueError(f"token-indexed tensors differ beyond their vocabulary axis: "
                             f"{[tuple(t.shape) for t in tensors]}")
        compute = dtype or views[0].dtype
        rows = torch.stack([self.rows[r] for r in refs])
        present = rows >= 0
        gathered = [v.to(compute)[r.clamp(min=0)] for v, r in zip(views, rows)]
        stand_in, has_stand_in = self._stand_ins(gathered, [v.to(compute) for v in views], refs, present, base,
                                                 compute)
        forced = self._forced(len(rows[0]))
        out = []
        for v, g, here in zip(views, gathered, present):
            keep = here & ~forced
            new = torch.where(keep[:, None], g.flatten(1), stand_in.flatten(1)).reshape(g.shape)
            missing = ~keep & ~has_stand_in
            if missing.any():
                logger.error("no row for %d token(s) of the output vocabulary (e.g. %r); they are zero",
                             int(missing.sum()), self._names(missing)[:3])
            if self.size > len(new):
                # the mean row, as https://nlp.stanford.edu/~johnhew/vocab-expansion.html suggests
                new = torch.cat([new, new.mean(0, keepdim=True).expand(self.size - len(new), *new.shape[1:])])
            out.append(new.to(v.dtype).movedim(0, axis))
        return out

    def _forced(self, n: int) -> torch.Tensor:
        forced = torch.zeros(n, dtype=torch.bool)
        for token, cfg in self.configured.items():
            if cfg.force:
                forced[self.tokens[token]] = True
        return forced

    def _names(self, mask: torch.Tensor) -> list[str]:
        by_id = {i: t for t, i in self.tokens.items()}
        return [by_id[int(i)] for i in mask.nonzero().flatten()]

    def _stand_ins(self, gathered: list[torch.Tensor], own: list[torch.Tensor], refs: Sequence[str],
                   present: torch.Tensor, base: str | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output token, the row a model that lacks it (or is forced) takes, and whether there is one.

        mergekit's rule for a token without a ``tokens`` entry: present in one model, that
        model's row; in none, zero; else the base's row if the base has it; else the average
        over the models that have it (summed in model order, in ``dtype``).
        """
        count = present.sum(0)
        total = torch.zeros_like(gathered[0])
        for g, here in zip(gathered, present):
            total = torch.where(here.view(-1, *[1] * (g.ndim - 1)), total + g, total)
        stand_in = total / count.clamp(min=1).view(-1, *[1] * (total.ndim - 1)).to(dtype)
        if base in refs:
            b = list(refs).index(base)
            use_base = present[b] & (count > 1)
            stand_in[use_base] = gathered[b][use_base]
        has = torch.ones(len(stand_in), dtype=torch.bool)
        for token, cfg in self.configured.items():
            j = self.tokens[token]
            row = self._configured_row(token, cfg, gathered, own, refs, present)
            if row is None:
                has[j] = False
            else:
                stand_in[j] = row
        return stand_in, has

    def _configured_row(self, token: str, cfg: TokenEmbedding, gathered: list[torch.Tensor],
                        own: list[torch.Tensor], refs: Sequence[str], present: torch.Tensor) -> torch.Tensor | None:
        j = self.tokens[token]
        if cfg.source == "zero":
            return torch.zeros_like(gathered[0][j])
        if cfg.source is None:
            here = present[:, j]
            if int(here.sum()) == 0:
                return torch.zeros_like(gathered[0][j])
            rows = [g[j] for g, h in zip(gathered, here) if h]
            return rows[0] if len(rows) == 1 else sum(rows[1:], rows[0].clone()) / len(rows)
        if cfg.source not in refs:
            return None
        m = list(refs).index(cfg.source)
        if cfg.token is None and cfg.token_id is None:
            return gathered[m][j] if present[m, j] else None
        source_id = cfg.token_id if cfg.token_id is not None else self.original[cfg.source][cfg.token]
        return own[m][source_id]


def token_indexed(config: Any, architecture: str | None) -> dict[str, int]:
    """The tensors a model indexes by token, and on which axis: its input and output embeddings'
    weights and biases (mergekit's rule; position and token-type embeddings are not), from the
    model built on the meta device.

    Example:
        >>> import transformers
        >>> token_indexed(transformers.GPT2Config(n_layer=1), "GPT2LMHeadModel")
        {'transformer.wte.weight': 0, 'lm_head.weight': 0}
    """
    import transformers

    cls = getattr(transformers, architecture or "", None)
    if cls is None or not hasattr(cls, "_from_config"):
        raise ValueError(f"cannot tell which tensors of {architecture!r} are indexed by token: transformers has no "
                         "such class; merge without tokenizer_source")
    with torch.device("meta"):
        model = cls._from_config(config)
    found = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None) if module is not None else None
            if isinstance(tensor, torch.Tensor):
                found[id(tensor)] = 0
    return {name: found[id(t)] for name, t in model.state_dict(keep_vars=True).items() if id(t) in found}


def stored_vocabulary(tokenizer: Any, vocab_size: int | None) -> dict[str, int]:
    """A model's vocabulary as its embeddings index it: the tokenizer's tokens below ``vocab_size``."""
    vocab = tokenizer.get_vocab()
    return vocab if vocab_size is None else {t: i for t, i in vocab.items() if i < vocab_size}


def build_vocabulary(
    tokenizers: Mapping[str, Any],
    vocab_sizes: Mapping[str, int | None],
    source: str,
    first: str,
    tokens: Mapping[str, TokenEmbedding] | None = None,
    pad_to_multiple_of: int | None = None,
) -> Vocabulary:
    """The output tokenizer and every model's rows of its tokens (mergekit's ``build_tokenizer``).

    Args:
        tokenizers: per model reference, its tokenizer (a model without one reads as ``first``'s).
        vocab_sizes: per model reference, the rows its embeddings have (``config.vocab_size``).
        source: ``"base"`` (``first``'s tokenizer), ``"union"`` (``first``'s, plus every other
            model's tokens it lacks, in model order) or a model reference (its tokenizer).
        first: the base model, or the first model when there is none.
        tokens: the ``tokens`` section: tokens to add if missing, and where their rows come from.
        pad_to_multiple_of: round the output's rows up to a multiple of it.

    Raises:
        ValueError: ``first`` has tokens past its embeddings (a tokenizer larger than the model).
    """
    tokens = dict(tokens or {})
    base = tokenizers[first]
    beyond = [t for t, i in base.get_vocab().items() if vocab_sizes.get(first) is not None and i >= vocab_sizes[first]]
    if beyond:
        raise ValueError(f"the tokenizer of {first} has {len(beyond)} token(s) past its {vocab_sizes[first]} embedding "
                         f"rows (e.g. {beyond[0]!r}); merge models whose tokenizers fit their embeddings")
    if source == "union":
        out = _union(base, tokenizers, vocab_sizes)
    elif source == "base":
        out = _copy(base)
    else:
        out = _copy(tokenizers[source])
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    for token, cfg in tokens.items():
        _check_source(token, cfg, tokenizers, vocab_sizes)
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    order = sorted(vocab, key=vocab.get)
    rows, original = {}, {}
    for ref in vocab_sizes:
        own = stored_vocabulary(tokenizers.get(ref, base), vocab_sizes[ref])
        original[ref] = own
        rows[ref] = torch.tensor([own.get(t, -1) for t in order], dtype=torch.long)
    return Vocabulary(out, {t: vocab[t] for t in order}, size, rows, original, tokens)


def _check_source(token: str, cfg: TokenEmbedding, tokenizers: Mapping[str, Any],
                  vocab_sizes: Mapping[str, int | None]) -> None:
    """A ``tokens`` entry must name a model of the merge, and one of its tokens."""
    if cfg.source in (None, "zero"):
        return
    if cfg.source not in vocab_sizes:
        raise ValueError(f"tokens.{token}: {cfg.source!r} is not a model of this merge; name one of "
                         f"{', '.join(vocab_sizes)}")
    size = vocab_sizes[cfg.source]
    if cfg.token is None and cfg.token_id is None and (
            cfg.source not in tokenizers or token not in stored_vocabulary(tokenizers[cfg.source], size)):
        raise ValueError(f"tokens.{token}: {cfg.source} has no token {token!r} (to take the row of another of its "
                         "tokens, write source: {kind: model_token, model: ..., token: ...})")
    if cfg.token is not None and (cfg.source not in tokenizers
                                  or cfg.token not in stored_vocabulary(tokenizers[cfg.source], size)):
        raise ValueError(f"tokens.{token}: {cfg.source} has no token {cfg.token!r}")
    if cfg.token_id is not None and not 0 <= cfg.token_id < (size or 0):
        raise ValueError(f"tokens.{token}: {cfg.source} has no token id {cfg.token_id} (its embeddings have "
                         f"{size} rows)")


def _copy(tokenizer: Any) -> Any:
    """A fresh copy of ``tokenizer`` (saved and reloaded, as mergekit does, so adding tokens to
    the output does not change a model's own)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _union(base: Any, tokenizers: Mapping[str, Any], vocab_sizes: Mapping[str, int | None]) -> Any:
    """``base``'s tokenizer plus, in model order and then id order, every token of the others it
    lacks (added tokens keep their settings: the first model's, when models disagree). mergekit
    adds them in its tokenizers' hash order, which changes from run to run: token for token the
    rows agree, the ids of added tokens may not."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tokenizer in tokenizers.items():
        size = vocab_sizes.get(ref)
        special = tokenizer.added_tokens_decoder
        special_text = {info.content for info in special.values()}
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if (size is None or i < size) and token not in special_text:
                plain.setdefault(token)
        for i, info in special.items():
            if (size is None or i < size) and info.content not in added:
                added[info.content] = info
    out = _copy(base)
    known = base.get_vocab()
    for token in plain:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out
