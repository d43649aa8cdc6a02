"""The reading side: blends, splits, sample fields, start-up checks, and building under gloo."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.dataset import build_datasets, check_data, collate, document_ids_and_positions
from data.preprocess import preprocess
from data.sources import Texts
from data.tokenizer import train_tokenizer
from tests.conftest import run_ranks


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, tokenizer, wiki_docs, plays) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prefixes")
    out = {}
    for name, docs in (("wiki", wiki_docs), ("plays", plays), ("tiny", wiki_docs[:10])):
        preprocess(Texts(name, docs), root / name, tokenizer, workers=2, shard_docs=100, progress=False)
        out[name] = str(root / name)
    return out


def config(tokenizer, tmp_path, prefixes: list[str], **overrides) -> DataConfig:
    values = {
        "seq_length": 64,
        "tokenizer": tokenizer.path,
        "cache_dir": str(tmp_path / "cache"),
        "split": "1",
    }
    return DataConfig(prefixes=prefixes, **{**values, **overrides})


@pytest.mark.parametrize("weights", [[0.8, 0.2], None])
def test_blend_honours_weights_over_many_samples(tmp_path, tokenizer, prefixes, weights):
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"], prefixes["plays"]], weights=weights)
    train, valid, test = build_datasets(cfg, (4000, 0, 0), seed=1, tokenizer=tokenizer)
    assert len(train) >= 4000 and valid is None and test is None
    share = Counter(int(train[i]["dataset_id"]) for i in range(4000))[0] / 4000
    if weights is None:  # by size: the share of tokens
        meta = check_data(cfg, tokenizer.vocab_size)
        weights = [meta[prefixes["wiki"]].tokens / sum(m.tokens for m in meta.values())]
    assert share == pytest.approx(weights[0], abs=0.01)


def test_more_samples_than_one_epoch_repeat_the_data(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["tiny"]])
    train, _, _ = build_datasets(cfg, (500, 0, 0), seed=1, tokenizer=tokenizer)
    assert len(train) >= 500
    assert len({tuple(train[i]["tokens"].tolist()) for i in range(500)}) < 500


def ngram_index(token_lists: list[list[int]], n: int) -> dict[tuple, set[int]]:
    index: dict[tuple, set[int]] = {}
    for doc, ids in enumerate(token_lists):
        for i in range(len(ids) - n + 1):
            index.setdefault(tuple(ids[i : i + n]), set()).add(doc)
    return index


def test_split_never_shares_a_document(tmp_path, tokenizer, prefixes, wiki_docs):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    n = 24  # token n-grams long enough to be unique to one Wikipedia lead section
    index = ngram_index([hf.encode(t, add_special_tokens=False) for t in wiki_docs], n)
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"]], split="80,10,10")
    splits = build_datasets(cfg, (300, 100, 100), seed=3, tokenizer=tokenizer)
    documents = []
    for dataset in splits:
        seen: set[int] = set()
        for i in range(len(dataset)):
            sample = torch.cat([dataset[i]["tokens"], dataset[i]["labels"][-1:]]).numpy()
            for piece in np.split(sample, np.flatnonzero(sample == tokenizer.eod_id) + 1):
                piece = piece[piece != tokenizer.eod_id].tolist()
                if len(piece) >= n:
                    seen |= index.get(tuple(piece[:n]), set())
        documents.append(seen)
    train, valid, test = documents
    assert len(train) > 200 and len(valid) > 20 and len(test) > 20
    assert not train & valid and not train & test and not valid & test


def test_samples_shift_labels_and_mask_eod_loss(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"]], eod_mask_loss=True)
    train, _, _ = build_datasets(cfg, (64, 0, 0), seed=1, tokenizer=tokenizer)
    batch = collate([train[i] for i in range(8)])
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (8, 64)
    assert batch.tokens.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.long
    assert batch.loss_mask.dtype == torch.float32 and batch.document_ids is None
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert torch.equal(batch.loss_mask, (batch.tokens != tokenizer.eod_id).float())
    assert torch.equal(batch.position_ids, torch.arange(64).expand(8, 64))
    assert (batch.tokens == tokenizer.eod_id).any(), "packed samples cross document ends"


def test_document_ids_and_positions_on_a_hand_built_sample():
    e = 0
    tokens = torch.tensor([[5, 6, e, 7, e, e, 8, 9], [e, 5, 6, 7, 8, 9, 5, e]])
    document_ids, positions = document_ids_and_positions(tokens, eod_id=e)
    assert document_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_document_masks_give_document_ids_and_restarted_positions(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"]], document_masks=True)
    train, _, _ = build_datasets(cfg, (32, 0, 0), seed=1, tokenizer=tokenizer)
    batch = collate([train[i] for i in range(32)])
    for tokens, documents, positions in zip(
        batch.tokens, batch.document_ids, batch.position_ids, strict=True
    ):
        document, position = 0, 0
        for t, d, p in zip(tokens.tolist(), documents.tolist(), positions.tolist(), strict=True):
            assert (d, p) == (document, position)
            position += 1
            if t == tokenizer.eod_id:
                document, position = document + 1, 0


def test_held_out_prefixes_feed_validation(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"]], valid_prefixes=[prefixes["plays"]])
    train, valid, test = build_datasets(cfg, (100, 50, 0), seed=1, tokenizer=tokenizer)
    assert len(train) >= 100 and len(valid) >= 50 and test is None
    assert {int(valid[i]["dataset_id"]) for i in range(50)} == {0}


def test_cache_is_written_once_and_reused(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"], prefixes["plays"]], split="90,10,0")
    first = build_datasets(cfg, (200, 20, 0), seed=5, tokenizer=tokenizer)[0]
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert files
    second = build_datasets(cfg, (200, 20, 0), seed=5, tokenizer=tokenizer)[0]
    assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert all(torch.equal(first[i]["tokens"], second[i]["tokens"]) for i in range(200))


def test_missing_prefix_names_the_path_and_the_command(tmp_path, tokenizer):
    cfg = config(tokenizer, tmp_path, [str(tmp_path / "nothing")])
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin.*preprocess_data\.py --input"):
        check_data(cfg, tokenizer.vocab_size)


def test_unfinished_prefix_says_so(tmp_path, tokenizer, prefixes):
    for suffix in (".bin", ".idx"):  # a copy without its metadata, as a killed merge would leave
        shutil.copyfile(prefixes["tiny"] + suffix, tmp_path / f"half{suffix}")
    with pytest.raises(FileNotFoundError, match=r"half\.json.*did not finish"):
        check_data(config(tokenizer, tmp_path, [str(tmp_path / "half")]), tokenizer.vocab_size)


def test_vocab_mismatch_names_both_sizes(tmp_path, tokenizer, prefixes):
    with pytest.raises(ValueError, match=r"vocabulary of 768 .* model's vocab_size is 4096"):
        check_data(config(tokenizer, tmp_path, [prefixes["wiki"]]), vocab_size=4096)


def test_mask_id_mismatch_names_both_ids(tmp_path, tokenizer, prefixes):
    with pytest.raises(ValueError, match=r"mask id 2 .* model uses mask id 100"):
        check_data(config(tokenizer, tmp_path, [prefixes["wiki"]]), tokenizer.vocab_size, mask_id=100)


def test_split_without_documents_for_a_part_is_refused(tmp_path, tokenizer, prefixes):
    cfg = config(tokenizer, tmp_path, [prefixes["tiny"]], split="98,1,1")  # 10 documents
    with pytest.raises(ValueError, match=r"gives 0 of the 10 documents of .*tiny to valid"):
        check_data(cfg, tokenizer.vocab_size)


def test_data_from_another_tokenizer_is_refused(tmp_path, tokenizer, prefixes, wiki_docs):
    other = train_tokenizer(wiki_docs[:50], tmp_path / "other", tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"is not the tokenizer the data was written with"):
        build_datasets(config(other, tmp_path, [prefixes["wiki"]]), (10, 0, 0), seed=1, tokenizer=other)
    preprocess(Texts("w", wiki_docs[:30]), tmp_path / "w_other", other, progress=False)
    cfg = config(tokenizer, tmp_path, [prefixes["wiki"], str(tmp_path / "w_other")])
    with pytest.raises(ValueError, match=r"different tokenizers"):
        check_data(cfg, tokenizer.vocab_size)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"prefixes": []}, "data.prefixes"),
        ({"weights": [1.0]}, "data.weights"),
        ({"split": "a,b"}, "data.split"),
        ({"valid_prefixes": ["x", "y"]}, "data.valid_prefixes"),
    ],
)
def test_config_errors_name_the_key(tmp_path, tokenizer, override, key):
    cfg = dataclasses.replace(config(tokenizer, tmp_path, ["x", "z"]), **override)
    with pytest.raises(ValueError, match=key):
        cfg.validate()


def test_two_gloo_ranks_build_from_one_cache(tmp_path, tokenizer, prefixes):
    from tests.data import dist_worker

    run = partial(
        dist_worker.run,
        out=tmp_path,
        tokenizer=tokenizer.path,
        prefixes=[prefixes["wiki"], prefixes["plays"]],
    )
    run_ranks(run, 2, tmp_path / "rank", timeout=120)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(rank0["tokens"], rank1["tokens"])
    assert rank0["built"] and not rank1["built"], "rank 0 builds the indices, rank 1 reads its cache"
