"""The files of a Hugging Face model folder, by name: weights, weight indexes, shards, tokenizer.

Reading (:mod:`~merge_graphs.io.checkpoint`), downloading (:mod:`~merge_graphs.io.hub`) and
writing (:mod:`~merge_graphs.io.writer`) all name the same files; they take the names from here.

Example:
    >>> from merge_graphs.io.files import SAFE_WEIGHTS, shard_name
    >>> SAFE_WEIGHTS, shard_name(0, 3)
    ('model.safetensors', 'model-00001-of-00003.safetensors')
"""

from __future__ import annotations

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

#: Tokenizer files (top-level files matching these patterns): ``tokenizer.json``,
#: ``tokenizer_config.json``, ``tokenizer.model``, ``vocab.txt``, ``vocab.json``, ``merges.txt``,
#: sentencepiece ``*.model``, tiktoken files, chat templates ...
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
)


def shard_name(index: int, count: int) -> str:
    """The file of safetensors shard ``index`` (from 0) of ``count``, as transformers names it."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"
