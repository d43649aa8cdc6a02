"""The random-token corpus goes through the trainer's own data checks and reader."""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data.config import DataConfig
from data.dataset import check_data
from data.synthetic import random_token_corpus
from data.tokenizer import load_tokenizer


def test_a_random_corpus_of_a_large_vocabulary_passes_the_trainers_checks(tmp_path):
    vocab = 131072
    prefix, tokenizer_dir = random_token_corpus(
        tmp_path, vocab, documents=20, document_tokens=(10, 30), seed=3
    )
    cfg = DataConfig(prefixes=[str(prefix)], seq_length=16, tokenizer=str(tokenizer_dir), split="90,10,0")
    (metadata,) = check_data(cfg, vocab_size=vocab, mask_id=2).values()
    assert metadata.documents == 20 and metadata.tokenizer.vocab_size == vocab
    documents = IndexedDataset(str(prefix))
    lengths = [len(documents[i]) for i in range(len(documents))]
    assert len(documents) == 20 and all(11 <= n <= 31 for n in lengths) and sum(lengths) == metadata.tokens
    for i in range(len(documents)):
        ids = np.asarray(documents[i])
        assert ids[-1] == 0 and (ids[:-1] >= 3).all() and (ids < vocab).all()  # EOD ends each; no specials
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer("w5 w131071")["input_ids"] == [5, 131071]
    assert tokenizer.decode([7, 8]) == "w7 w8"
