"""Small, deterministic models trained on CPU in seconds, for tests and benchmarks.

Everything here is reproducible bit for bit from a seed: the data split, the initial
weights and the training order. Different seeds give networks that compute nearly the same
function with their hidden units in a different order, the situation merge-graphs exists for.
The GNN's pretraining zoo (:mod:`merge_graphs.lab.pretraining_zoo`) builds on these trainers.

Example:
    >>> from merge_graphs.lab.trainers import load_digits_split, train_digits_mlp
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
    seed: int = 0, test_fraction: float = 0.2, *, standardize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 64 features, 10 classes), split and standardized.

    The data ships inside scikit-learn, so this works offline. The split is stratified and
    fixed by ``seed``; features are standardized with the training set's mean and standard
    deviation (constant features are only centred), or with ``standardize=False`` left as the
    pixel intensities 0-16.

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
    mean, std = 0.0, 1.0
    if standardize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
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


# --- Tiny byte-level GPT-2 language models on Python standard-library docstrings ---------------
#
# The corpus is English prose (with code examples) from the docstrings of a fixed list of
# standard-library modules, read with ``inspect`` in a fresh interpreter: it is on every
# machine that has Python, needs no download, and is distributed under the PSF license, so
# models trained on it (and a small held-out sample of it) can ship in the repository.
# Docstrings change between Python releases, so the corpus (and the models trained on it) is
# reproducible for one Python version; :func:`docstring_corpus_sha256` identifies it.

#: Modules whose docstrings make the training text (about 0.7 MB on Python 3.11). Only modules
#: that every CPython build has (no tkinter, sqlite3, lzma, ...), in a fixed order.
DOCSTRING_TRAIN_MODULES = (
    "builtins", "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "collections.abc", "colorsys", "configparser", "contextlib", "copy",
    "copyreg", "csv", "dataclasses", "datetime", "decimal", "dis", "email.message", "email.parser",
    "email.utils", "enum", "filecmp", "fnmatch", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "importlib", "importlib.abc", "importlib.metadata", "inspect", "io",
    "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale",
    "logging", "logging.handlers", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse",
    "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "stat", "string", "struct", "subprocess", "tarfile", "tempfile", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "unittest.suite", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)

#: Modules whose docstrings make the held-out text (about 45 KB): disjoint from the training
#: modules, and any docstring that also occurs in the training text is dropped.
DOCSTRING_HELDOUT_MODULES = ("difflib", "textwrap", "fractions", "statistics")

#: The byte-level GPT-2 of the offline quickstart: 264k parameters, about 1.06 MB in float32.
BYTE_GPT2 = {"n_embd": 80, "n_layer": 3, "n_head": 4, "n_positions": 128}

#: Token ids 0-255 are the bytes themselves; 256 is ``<|endoftext|>`` (bos = eos).
BYTE_VOCAB_SIZE = 257
BYTE_EOS = "<|endoftext|>"


def _cleaned_doc(obj) -> str | None:
    doc = getattr(obj, "__doc__", None)  # not inspect.getdoc: that inherits docstrings from bases
    if not isinstance(doc, str) or not doc.strip():
        return None
    import inspect

    return inspect.cleandoc(doc)


def module_docstrings(modules: Sequence[str]) -> list[str]:
    """The docstrings of ``modules`` in a fixed order, each once.

    For every module, in the given order: the module's docstring, then (by name) those of its
    public classes and functions defined in it, each class followed by its public methods,
    properties and ``__init__`` written in the class body. Docstrings are cleaned with
    ``inspect.cleandoc``; repeats (``"Return self==value."``) are kept at their first occurrence
    only. What other imported libraries add to stdlib modules can still change the result:
    :func:`load_docstring_corpus` runs this in a fresh interpreter.

    Raises:
        RuntimeError: Python runs with ``-OO``, which strips docstrings.

    Example:
        >>> docs = module_docstrings(["colorsys"])
        >>> docs[0].splitlines()[0]
        'Conversion functions between RGB and other color systems.'
    """
    import importlib
    import inspect
    import sys
    import warnings

    if sys.flags.optimize >= 2:
        raise RuntimeError("Python runs with -OO, which strips docstrings; run without it to build the corpus")
    found: list[str | None] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            module = importlib.import_module(module_name)
            found.append(_cleaned_doc(module))
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                found.append(_cleaned_doc(obj))
                if not inspect.isclass(obj):
                    continue
                for member_name, member in sorted(vars(obj).items()):
                    if member_name.startswith("_") and member_name != "__init__":
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if not (inspect.isroutine(member) or isinstance(member, property)):
                        continue
                    # Only members written in the class itself: other libraries add methods to
                    # stdlib classes (transformers adds ``warning_once`` to ``logging.Logger``).
                    qualname = getattr(getattr(member, "fget", member), "__qualname__", "")
                    if qualname.startswith(f"{obj.__qualname__}."):
                        found.append(_cleaned_doc(member))
    seen: set[str] = set()
    out = []
    for doc in found:
        if doc and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def load_docstring_corpus(split: str = "train") -> str:
    """The standard-library docstring corpus: ``"train"`` or ``"heldout"`` text.

    Docstrings are joined by blank lines. The held-out text comes from
    :data:`DOCSTRING_HELDOUT_MODULES`, which the training modules do not include, and leaves out
    every docstring that also occurs in the training text.

    Example:
        >>> heldout = load_docstring_corpus("heldout")
        >>> 20_000 < len(heldout.encode()) < 60_000
        True
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
    train = _fresh_module_docstrings(DOCSTRING_TRAIN_MODULES)
    if split == "train":
        return "\n\n".join(train)
    seen = set(train)
    return "\n\n".join(d for d in _fresh_module_docstrings(DOCSTRING_HELDOUT_MODULES) if d not in seen)


def _fresh_module_docstrings(modules: Sequence[str]) -> list[str]:
    """:func:`module_docstrings` in a new, isolated interpreter (``python -I -S``) that imports
    nothing but the standard library, so the corpus does not depend on what the caller imported."""
    import inspect
    import json
    import subprocess
    import sys

    source = "\n".join(["from __future__ import annotations", "import json, sys",
                        inspect.getsource(_cleaned_doc), inspect.getsource(module_docstrings),
                        "json.dump(module_docstrings(json.loads(sys.argv[1])), sys.stdout)"])
    done = subprocess.run([sys.executable, "-I", "-S", "-c", source, json.dumps(list(modules))],
                          capture_output=True, text=True, encoding="utf-8", check=False)
    if done.returncode:
        raise RuntimeError(f"reading the standard library's docstrings failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def docstring_corpus_sha256(text: str) -> str:
    """The SHA-256 of a corpus text's UTF-8 bytes (to tell whether two machines built the same corpus)."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what a ByteLevel tokenizer shows)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer(model_max_length: int = BYTE_GPT2["n_positions"]):
    """A Hugging Face fast tokenizer whose token ids are the UTF-8 bytes of the text (plus ``<|endoftext|>``).

    A ``tokenizers`` ByteLevel BPE with no merges: id ``b`` is byte ``b``, id 256 the end of
    text (bos = eos; no padding token). It saves with ``save_pretrained`` and loads back with
    ``AutoTokenizer.from_pretrained`` offline; decoding round-trips any valid UTF-8 text.

    Example:
        >>> tok = byte_tokenizer()
        >>> tok("héllo")["input_ids"] == list("héllo".encode())
        True
        >>> tok.decode(tok("héllo")["input_ids"])
        'héllo'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[BYTE_EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BYTE_EOS, eos_token=BYTE_EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)


def make_byte_gpt2(seed: int | None = None, **config):
    """A fresh byte-level ``GPT2LMHeadModel`` (vocabulary 257, no dropout), initialized from ``seed``.

    ``config`` overrides :data:`BYTE_GPT2` and any other ``GPT2Config`` field. With a seed the
    global random state is left as it was.

    Example:
        >>> m = make_byte_gpt2(0, n_embd=16, n_layer=1, n_head=2, n_positions=8)
        >>> m.config.vocab_size, sum(p.numel() for p in m.parameters())
        (257, 7552)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(BYTE_GPT2, vocab_size=BYTE_VOCAB_SIZE, bos_token_id=256, eos_token_id=256,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _seeded_model(GPT2LMHeadModel, GPT2Config(**{**fields, **config}), seed)


def _seeded_model(cls, config, seed: int | None):
    """``cls(config)`` in eval mode, initialized from ``seed`` (the global random state left as it was)."""
    with _seeded(seed) if seed is not None else contextlib.nullcontext():
        model = cls(config)
    return model.eval()


def train_byte_gpt2(
    text: str | bytes,
    seed: int,
    *,
    steps: int = 800,
    batch_size: int = 32,
    seq_len: int | None = None,
    lr: float = 1e-3,
    warmup: int = 100,
    final_lr_fraction: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    threads: int | None = 1,
    **config,
):
    """A byte-level GPT-2 (:func:`make_byte_gpt2`) trained on ``text`` with next-byte cross-entropy.

    Each step takes ``batch_size`` windows of ``seq_len`` bytes (default: the model's context)
    at random offsets of the text; AdamW (betas 0.9/0.95, weight decay on matrices only) with a
    linear warmup over ``warmup`` steps, then a cosine decay to ``final_lr_fraction * lr``;
    gradients clipped to norm ``grad_clip``.

    Deterministic: ``seed`` sets the initial weights (torch's global generator, seeded inside a
    forked state) and the batch offsets (a local generator), and training runs on ``threads``
    CPU threads (1 by default; 2 threads give different floating-point sums, hence different
    weights; the previous setting is restored). Two seeds give the classic pair for alignment:
    same data and hyperparameters, different initialization and batch order.

    Returns:
        The model, in eval mode.

    Example:
        >>> import torch
        >>> small = dict(n_embd=16, n_layer=1, n_head=2, n_positions=16, steps=3, batch_size=2, warmup=1)
        >>> a = train_byte_gpt2("the quick brown fox " * 10, seed=0, **small)
        >>> b = train_byte_gpt2("the quick brown fox " * 10, seed=0, **small)
        >>> all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        True
    """
    model = make_byte_gpt2(seed, **config)
    return train_byte_lm(model, text, seed, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                         warmup=warmup, final_lr_fraction=final_lr_fraction, weight_decay=weight_decay,
                         grad_clip=grad_clip, threads=threads)


def train_byte_lm(
    model,
    text: str | bytes,
    seed: int,
    *,
    masked: bool = False,
    mask_id: int | None = None,
    steps: int = 800,
    batch_size: int = 32,
    seq_len: int | None = None,
    lr: float = 1e-3,
    warmup: int = 100,
    final_lr_fraction: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    threads: int | None = 1,
):
    """Train a byte-level transformers LM in place on ``text``: next-byte cross-entropy, or with
    ``masked`` BERT's masked-LM loss (15% of bytes replaced by ``mask_id``).

    The loop of :func:`train_byte_gpt2` (same optimizer, schedule and determinism), for any
    model whose ``forward(input_ids=..., labels=...)`` returns a loss and whose vocabulary
    holds the 256 bytes: GPT-2, Llama and BERT alike. The initial weights are the model's own.

    Returns:
        The model, in eval mode.
    """
    import math

    data = torch.frombuffer(bytearray(text.encode("utf-8") if isinstance(text, str) else text), dtype=torch.uint8)
    data = data.long()
    context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    seq_len = seq_len or context
    if seq_len > context:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {context}")
    if len(data) <= seq_len:
        raise ValueError(f"the text has {len(data)} bytes; training needs more than one window of {seq_len}")
    if masked and mask_id is None:
        raise ValueError("masked-LM training needs mask_id: the id of the mask token")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    start = time.perf_counter()
    model.train()
    with _seeded(seed), _threads(threads):
        for step in range(steps):
            starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=gen)
            batch = data[starts[:, None] + offsets]
            if masked:
                hide = torch.rand(batch.shape, generator=gen) < 0.15
                loss = model(input_ids=batch.masked_fill(hide, mask_id), labels=batch.masked_fill(~hide, -100)).loss
            else:
                loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                logger.info("%s seed %d step %d/%d: train loss %.4f", type(model).__name__, seed, step + 1, steps,
                            loss.item())
    model.eval()
    logger.info("trained %s (seed %d, %d steps) in %.1f s", type(model).__name__, seed, steps,
                time.perf_counter() - start)
    return model


#: The byte-level Llama of the ``llama`` benchmark: 3 layers, width 128, 4 query heads sharing 2 key-value heads
#: (GQA, head dim 32), RoPE (the default theta 10000), a SwiGLU MLP of 344 units (Llama's 8/3 x width, rounded up
#: to a multiple of 8), RMSNorm, context 128, no biases, 610k parameters. The output head is *not* tied to the
#: embedding, as in Llama 2/3 and Mistral (LlamaConfig's default): each is then its own matrix in the symmetry spec,
#: and folding the final RMSNorm into the head keeps the model exact with nothing to untie.
BYTE_LLAMA = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 344, "max_position_embeddings": 128, "tie_word_embeddings": False}


def make_byte_lm(architecture: str, seed: int | None = None, **config):
    """A fresh byte-level causal LM of any transformers decoder class (vocabulary 257 as :func:`make_byte_gpt2`'s,
    bos = eos = 256, no padding token, no attention dropout), initialized from ``seed``.

    ``architecture`` names the model class (``"Qwen3ForCausalLM"``); its config class (``Qwen3Config``) is the
    class's own, and ``config`` sets its fields (sizes, and what sets the family apart). With a seed the global
    random state is left as it was. Train it with :func:`train_byte_lm`.

    Example:
        >>> m = make_byte_lm("Qwen3ForCausalLM", 0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                  num_key_value_heads=1, head_dim=8, intermediate_size=32, max_position_embeddings=8)
        >>> type(m.config).__name__, m.config.vocab_size, m.config.pad_token_id
        ('Qwen3Config', 257, None)
    """
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"transformers has no model class {architecture!r}; name one such as 'LlamaForCausalLM'")
    fields = dict(vocab_size=BYTE_VOCAB_SIZE, bos_token_id=256, eos_token_id=256, pad_token_id=None,
                  attention_dropout=0.0)
    return _seeded_model(cls, cls.config_class(**{**fields, **config}), seed)


def make_byte_llama(seed: int | None = None, **config):
    """A fresh byte-level ``LlamaForCausalLM`` (:func:`make_byte_lm` of :data:`BYTE_LLAMA`), initialized from
    ``seed``; ``config`` overrides :data:`BYTE_LLAMA` and any other ``LlamaConfig`` field.

    Example:
        >>> m = make_byte_llama(0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                     intermediate_size=32, max_position_embeddings=8)
        >>> m.config.vocab_size, m.config.tie_word_embeddings, sum(p.numel() for p in m.parameters())
        (257, False, 10576)
    """
    return make_byte_lm("LlamaForCausalLM", seed, **{**BYTE_LLAMA, **config})


__all__ += [
    "BYTE_GPT2", "BYTE_LLAMA", "DOCSTRING_HELDOUT_MODULES", "DOCSTRING_TRAIN_MODULES", "byte_tokenizer",
    "docstring_corpus_sha256", "load_docstring_corpus", "make_byte_gpt2", "make_byte_lm", "make_byte_llama",
    "module_docstrings", "train_byte_gpt2", "train_byte_lm",
]



# --- Tiny BERT classifiers reading a digit as a sequence of pixel tokens ----------------------------
#
# A post-LayerNorm encoder with a sequence-classification head, as people fine-tune BERT, on data
# that ships offline and that a model of 300k parameters learns in a minute on one CPU core.

#: The digits BERT of the ``bert`` benchmark: 3 post-LN layers, width 64, 4 heads (157k parameters).
DIGITS_BERT = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256}

#: Token ids 0-16 are pixel intensities; 17 is ``[CLS]``, whose final state the pooler reads.
DIGITS_CLS = 17


class SequenceLogits(nn.Module):
    """A transformers sequence classifier seen as ``x -> logits``, ``x[:, 0]`` the token ids and ``x[:, 1]``
    the attention mask, so that :func:`train_classifier` and :mod:`merge_graphs.evaluate`'s metrics serve it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def load_digit_tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`load_digits_split` (``seed``) as token sequences: ``[CLS]`` then the 64 pixel intensities (0-16).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``x`` int64 ``(n, 2, 65)`` (token ids, attention
        mask; see :class:`SequenceLogits`), ``y`` the digits.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_digit_tokens()
        >>> x_tr.shape, int(x_tr[:, 0, 1:].max()), x_tr[0, 0, 0].item() == DIGITS_CLS
        (torch.Size([1437, 2, 65]), 16, True)
    """
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, standardize=False)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full((len(x), 1), DIGITS_CLS), x.round().long()], 1)
        return torch.stack([ids, torch.ones_like(ids)], 1)

    return tokens(x_tr), y_tr, tokens(x_te), y_te


def make_digits_bert(seed: int | None = None, **config):
    """A fresh ``BertForSequenceClassification`` over digit tokens (:data:`DIGITS_BERT`, vocabulary 18,
    context 65, 10 labels, no dropout), initialized from ``seed``; ``config`` overrides any ``BertConfig``
    field. With a seed the global random state is left as it was.

    Example:
        >>> m = make_digits_bert(0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        >>> m.config.vocab_size, m.config.num_labels
        (18, 10)
    """
    from transformers import BertConfig, BertForSequenceClassification

    fields = dict(DIGITS_BERT, vocab_size=DIGITS_CLS + 1, pad_token_id=None, max_position_embeddings=65,
                  type_vocab_size=1, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(config)
    ctx = _seeded(seed) if seed is not None else contextlib.nullcontext()
    with ctx:
        model = BertForSequenceClassification(BertConfig(**fields))
    return model.eval()


def train_digits_bert(seed: int, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 32, split_seed: int = 0,
                      **config):
    """A :func:`make_digits_bert` model (``seed``) trained on :func:`load_digit_tokens` (``split_seed``) with
    :func:`train_classifier` (Adam, deterministic, one thread); returns the ``BertForSequenceClassification``.

    Example:
        >>> m = train_digits_bert(0, epochs=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                       intermediate_size=32)
        >>> type(m).__name__
        'BertForSequenceClassification'
    """
    x_tr, y_tr, _, _ = load_digit_tokens(split_seed)
    model = make_digits_bert(seed, **config)
    train_classifier(SequenceLogits(model), x_tr, y_tr, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size)
    return model.eval()


__all__ += ["DIGITS_BERT", "DIGITS_CLS", "SequenceLogits", "load_digit_tokens", "make_digits_bert",
            "train_digits_bert"]


# --- Tiny ViT classifiers reading a digit as a 1-channel 8x8 image ----------------------------------
#
# The pre-LayerNorm counterpart of the digits BERT: the same data, seen as pixels cut into 2x2
# patches, so that the residual stream admits rotations as well as permutations.

#: The digits ViT of the ``vit`` benchmark: 3 pre-LN layers, width 64, 4 heads, 16 patches of 2x2 pixels.
DIGITS_VIT = {"image_size": 8, "num_channels": 1, "patch_size": 2, "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "intermediate_size": 256}


class ImageLogits(nn.Module):
    """A transformers image classifier seen as ``pixel_values -> logits``, so that :func:`train_classifier`
    and :mod:`merge_graphs.evaluate`'s metrics serve it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_digit_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`load_digits_split` (``seed``) as images: float32 ``(n, 1, 8, 8)``, intensities scaled to [0, 1].

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_digit_images()
        >>> x_tr.shape, float(x_tr.max())
        (torch.Size([1437, 1, 8, 8]), 1.0)
    """
    x_tr, y_tr, x_te, y_te = load_digits_split(seed, standardize=False)
    return (x_tr / 16).reshape(-1, 1, 8, 8), y_tr, (x_te / 16).reshape(-1, 1, 8, 8), y_te


def make_digits_vit(seed: int | None = None, **config):
    """A fresh ``ViTForImageClassification`` over 8x8 digit images (:data:`DIGITS_VIT`, 10 labels, no dropout),
    initialized from ``seed``; ``config`` overrides any ``ViTConfig`` field. With a seed the global random
    state is left as it was.

    Example:
        >>> m = make_digits_vit(0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        >>> m.config.num_labels, m.config.num_channels, m.config.patch_size
        (10, 1, 2)
    """
    from transformers import ViTConfig, ViTForImageClassification

    fields = dict(DIGITS_VIT, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded_model(ViTForImageClassification, ViTConfig(**{**fields, **config}), seed)


def train_digits_vit(seed: int, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 32, split_seed: int = 0,
                     **config):
    """A :func:`make_digits_vit` model (``seed``) trained on :func:`load_digit_images` (``split_seed``) with
    :func:`train_classifier` (Adam, deterministic, one thread); returns the ``ViTForImageClassification``.

    Example:
        >>> m = train_digits_vit(0, epochs=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=32)
        >>> type(m).__name__
        'ViTForImageClassification'
    """
    x_tr, y_tr, _, _ = load_digit_images(split_seed)
    model = make_digits_vit(seed, **config)
    train_classifier(ImageLogits(model), x_tr, y_tr, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size)
    return model.eval()


__all__ += ["DIGITS_VIT", "ImageLogits", "load_digit_images", "make_digits_vit", "train_digits_vit"]


#: The digits CLIP's towers (``CLIPConfig`` fields; ``text_config`` / ``vision_config`` are merged into
#: ``CLIPTextConfig`` / ``CLIPVisionConfig`` defaults): 8x8 one-channel images in 2x2 patches, captions of
#: :data:`DIGIT_CAPTIONS`'s six tokens.
DIGITS_CLIP = {
    "projection_dim": 32,
    "text_config": {"vocab_size": 16, "max_position_embeddings": 8, "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "intermediate_size": 256, "bos_token_id": 0, "eos_token_id": 14,
                    "pad_token_id": 15},
    "vision_config": {"image_size": 8, "num_channels": 1, "patch_size": 2, "hidden_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
}
#: Class ``k``'s caption "<bos> this is digit k <eos>" as token ids (row ``k``). The text tower pools at the
#: first ``eos_token_id`` (14), so every caption is read at its last token.
DIGIT_CAPTIONS = torch.tensor([[0, 1, 2, 3, 4 + k, 14] for k in range(10)])


class ZeroShotLogits(nn.Module):
    """A ``CLIPModel`` seen as ``pixel_values -> logits`` against :data:`DIGIT_CAPTIONS` (zero-shot
    classification: ``logits_per_image``), so that :mod:`merge_graphs.evaluate`'s metrics serve it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, input_ids=DIGIT_CAPTIONS).logits_per_image


def make_digits_clip(seed: int | None = None, **config):
    """A fresh ``CLIPModel`` over 8x8 digit images and :data:`DIGIT_CAPTIONS` (:data:`DIGITS_CLIP`, no
    dropout), initialized from ``seed``; ``config`` overrides ``CLIPConfig`` fields, and its ``text_config``
    / ``vision_config`` dicts override single tower fields. With a seed the global random state is left as
    it was.

    Example:
        >>> m = make_digits_clip(0, vision_config={"hidden_size": 16, "intermediate_size": 32})
        >>> m.config.vision_config.patch_size, m.config.text_config.vocab_size, m.config.projection_dim
        (2, 16, 32)
    """
    from transformers import CLIPConfig, CLIPModel

    fields = {**DIGITS_CLIP, **config}
    towers = {name: {**DIGITS_CLIP[name], **config.get(name, {}), "dropout": 0.0, "attention_dropout": 0.0}
              for name in ("text_config", "vision_config")}
    return _seeded_model(CLIPModel, CLIPConfig(**{**fields, **towers}), seed)


def train_digits_clip(seed: int, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 32, split_seed: int = 0,
                      threads: int | None = 1, **config):
    """A :func:`make_digits_clip` model (``seed``) trained with CLIP's own contrastive loss
    (``return_loss=True``) on image/caption pairs of :func:`load_digit_images` (``split_seed``): each
    training image beside its class's caption. Adam at ``lr``; deterministic like :func:`train_classifier`
    (shuffled by ``seed``, ``threads`` CPU threads). Returns the ``CLIPModel`` in eval mode.

    A batch holds several images of one class, so their captions are identical and the contrastive loss
    cannot reach zero; it still pulls each image towards its caption and away from other classes'.

    Example:
        >>> m = train_digits_clip(0, epochs=1, vision_config={"num_hidden_layers": 1})
        >>> type(m).__name__
        'CLIPModel'
    """
    x, y, _, _ = load_digit_images(split_seed)
    model = make_digits_clip(seed, **config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    with _seeded(seed), _threads(threads):
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = model(pixel_values=x[idx], input_ids=DIGIT_CAPTIONS[y[idx]], return_loss=True).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    logger.info("trained digits CLIP for %d epochs (seed %d) in %.2f s", epochs, seed, time.perf_counter() - start)
    return model.eval()


__all__ += ["DIGITS_CLIP", "DIGIT_CAPTIONS", "ZeroShotLogits", "make_digits_clip", "train_digits_clip"]
