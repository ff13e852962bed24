"""Small, deterministic models trained on CPU in seconds, for tests and benchmarks.

Everything here is reproducible bit for bit from a seed: the data split, the initial
weights and the training order. Different seeds give networks that compute nearly the same
function with their hidden units in a different order, the situation merge-graphs exists for.
The GNN model zoo builds on these trainers.

Example:
    >>> from merge_graphs.zoo import load_digits_split, train_digits_mlp
    >>> from merge_graphs.evaluate import accuracy
    >>> x_tr, y_tr, x_te, y_te = load_digits_split()
    >>> model = train_digits_mlp(seed=0, widths=(64, 32, 10), epochs=5)
    >>> accuracy(model, x_te, y_te) > 0.8
    True
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "load_digits_split", "make_mlp", "train_classifier", "train_digits_mlp"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 64 features, 10 classes), split and standardized.

    The data ships inside scikit-learn, so this works offline. The split is stratified and
    fixed by ``seed``; features are standardized with the training set's mean and standard
    deviation (constant features are only centred).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 features ``(n, 64)``, int64 labels.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_digits_split()
        >>> x_tr.shape, x_te.shape, x_tr.dtype, y_tr.dtype
        (torch.Size([1437, 64]), torch.Size([360, 64]), torch.float32, torch.int64)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0

    def prep(a):
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    return prep(x_tr), torch.as_tensor(y_tr, dtype=torch.int64), prep(x_te), torch.as_tensor(y_te, dtype=torch.int64)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_mlp(widths: Sequence[int], activation: str = "relu", *, seed: int | None = None) -> nn.Sequential:
    """An MLP ``Linear -> act -> ... -> Linear`` as a plain ``nn.Sequential``.

    Args:
        widths: input size, hidden sizes, output size, e.g. ``(64, 128, 128, 10)``.
        activation: one of :data:`ACTIVATIONS`.
        seed: if given, the initial weights come from this seed (PyTorch's default
            initialization) without touching the global random state; otherwise from the
            global generator.

    Example:
        >>> make_mlp([4, 8, 2])
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): ReLU()
          (2): Linear(in_features=8, out_features=2, bias=True)
        )
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths needs an input and an output size, all positive; got {widths}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    ctx = _seeded(seed) if seed is not None else contextlib.nullcontext()
    layers: list[nn.Module] = []
    with ctx:
        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
            if i:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    threads: int | None = 1,
) -> nn.Module:
    """Train a classifier in place with cross-entropy and return it (in eval mode).

    Deterministic: the shuffling order comes from a generator seeded with ``seed``, dropout
    (if any) draws from torch's global generator seeded with ``seed`` inside a forked state
    (the caller's random state is left as it was), and training runs on ``threads`` CPU
    threads (1 by default, so the floating-point reductions, and hence the weights, do not
    depend on the machine's core count; the previous setting is restored). The initial
    weights are the model's own: build it with ``make_mlp(..., seed=...)``.

    Args:
        model: maps ``x[batch]`` to logits.
        x, y: training inputs and int64 labels.
        seed: seeds shuffling and dropout.
        epochs, lr, batch_size, weight_decay: the usual.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        threads: torch threads during training, or None to leave the setting alone.

    Example:
        >>> import torch
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> a = train_classifier(make_mlp([3, 8, 2], seed=1), x, y, seed=0, epochs=2)
        >>> b = train_classifier(make_mlp([3, 8, 2], seed=1), x, y, seed=0, epochs=2)
        >>> all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        True
    """
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    start = time.perf_counter()
    model.train()
    with _seeded(seed), _threads(threads):
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            logger.debug("epoch %d: train loss %.4f", epoch, total / n)
    model.eval()
    logger.info("trained %s for %d epochs (seed %d) in %.2f s", type(model).__name__, epochs, seed,
                time.perf_counter() - start)
    return model


def train_digits_mlp(
    seed: int,
    widths: Sequence[int] = (64, 128, 128, 10),
    *,
    activation: str = "relu",
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    split_seed: int = 0,
) -> nn.Sequential:
    """An MLP trained on :func:`load_digits_split` (``split_seed``), initialized and shuffled by ``seed``.

    Two calls with different ``seed`` and the same ``split_seed`` give the classic pair for
    alignment: same data, different initialization and order.

    Example:
        >>> m = train_digits_mlp(seed=3, widths=(64, 16, 10), epochs=1)
        >>> m[0].weight.shape
        torch.Size([16, 64])
    """
    x_tr, y_tr, _, _ = load_digits_split(split_seed)
    model = make_mlp(widths, activation, seed=seed)
    return train_classifier(model, x_tr, y_tr, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size)
