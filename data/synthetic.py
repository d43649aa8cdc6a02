"""A random-token corpus of any vocabulary size, for throughput and systems checks (no text needed).

``random_token_corpus`` writes a word-level tokenizer over ``vocab_size`` tokens (``<|endoftext|>``,
``<|pad|>``, ``<|mask|>`` at ids 0, 1, 2, then ``w3`` .. ``w{V-1}``) and a Megatron indexed dataset of
documents of uniformly random tokens, with the metadata file the trainer checks. Nothing learnable is
in it: losses stay near ln(V). It lets a GPU check run a full-vocabulary model (131072 for the
Ministral-3 shapes) through the real data path without a corpus or the ``datasets`` package.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from data.metadata import DatasetMetadata
from data.preprocess import token_dtype
from data.tokenizer import EOD_TOKEN, MASK_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, load_tokenizer_info


def word_tokenizer(out_dir: str | Path, vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` tokens saved at ``out_dir``; returns its TokenizerInfo."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=words,
        eos_token=EOD_TOKEN,
        bos_token=EOD_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
    )
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    wrapped.save_pretrained(staging)
    os.replace(staging, out_dir)
    return load_tokenizer_info(out_dir)


def random_token_corpus(
    folder: str | Path,
    vocab_size: int,
    documents: int,
    document_tokens: tuple[int, int] = (256, 2048),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``folder/tokenizer`` and the dataset ``folder/random`` (``documents`` documents of a length
    drawn uniformly from ``document_tokens``, EOD-terminated); returns (prefix, tokenizer folder)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(folder / "tokenizer", vocab_size)
    prefix = folder / "random"
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    tokens = 0
    for _ in range(documents):
        length = int(rng.integers(document_tokens[0], document_tokens[1] + 1))
        ids = rng.integers(len(SPECIAL_TOKENS), vocab_size, size=length + 1).astype(dtype)
        ids[-1] = tokenizer.eod_id
        builder.add_document(ids, [ids.size])
        tokens += ids.size
    builder.finalize(f"{prefix}.idx")
    description = {"name": "random tokens", "vocab_size": vocab_size, "documents": documents, "seed": seed}
    DatasetMetadata(
        fingerprint=hashlib.sha256(repr((description, tokenizer.fingerprint)).encode()).hexdigest(),
        tokenizer=tokenizer,
        documents=documents,
        tokens=tokens,
        characters=0,
        skipped_documents=0,
        dtype=np.dtype(dtype).name,
        source=description,
    ).write(prefix)
    return prefix, folder / "tokenizer"
