"""Small real data for the data tests: slices of the bundled corpora and a BPE trained on them."""

from __future__ import annotations

import os

import pytest

# Never reach for the hub: an unknown datasets name must fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _corpus(name: str) -> dict[str, str]:
    from data.corpora import CORPORA, read_documents

    corpus = next(c for c in CORPORA if c.name == name)
    try:
        return read_documents(corpus)
    except FileNotFoundError as err:
        pytest.skip(f"bundled corpus missing ({err})")


@pytest.fixture(scope="session")
def wiki_docs() -> list[str]:
    """The first 400 Wikipedia lead sections (about 190 k characters)."""
    return list(_corpus("wiki").values())[:400]


@pytest.fixture(scope="session")
def plays() -> list[str]:
    """Two Shakespeare plays cut into their acts (about 30 documents of 5-40 k characters)."""
    texts = _corpus("shakespeare")
    acts = []
    for name in ("macbeth_gut", "julius_caesar_gut"):
        acts += [act for act in texts[name].split("\nACT ") if act.strip()]
    return acts


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, wiki_docs, plays):
    """A 768-token byte-level BPE trained on part of the slices (held-out text gets encoded too)."""
    from data.tokenizer import train_tokenizer

    return train_tokenizer(wiki_docs[:300] + plays[:10], tmp_path_factory.mktemp("tok") / "tokenizer", 768)
