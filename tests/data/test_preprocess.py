"""Text -> tokens -> .bin/.idx on real corpus slices: round trips, bad input, resuming a killed run."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from data.metadata import DatasetMetadata
from data.preprocess import preprocess
from data.sources import LocalFiles, Texts
from scripts.preprocess_data import main as preprocess_cli


def read_back(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def reference_ids(tokenizer, texts) -> list[list[int]]:
    """transformers' own encoding of each document, then EOD."""
    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    return [[*hf.encode(t, add_special_tokens=False), tokenizer.eod_id] for t in texts]


def write_jsonl(path: Path, texts, key="text", opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return path


def test_jsonl_round_trip_equals_the_tokenizers_encoding(tmp_path, tokenizer, wiki_docs):
    docs = wiki_docs[:120]
    source = LocalFiles([write_jsonl(tmp_path / "wiki.jsonl", docs)])
    result = preprocess(source, tmp_path / "out", tokenizer, workers=2, shard_docs=25, progress=False)
    assert read_back(tmp_path / "out") == reference_ids(tokenizer, docs)
    meta = DatasetMetadata.read(tmp_path / "out")
    assert meta == result.metadata
    assert (meta.documents, meta.skipped_documents, meta.dtype) == (120, 0, "uint16")
    assert meta.tokens == sum(map(len, reference_ids(tokenizer, docs)))
    assert meta.characters == sum(map(len, docs))
    assert meta.tokenizer == tokenizer
    assert not list(tmp_path.glob("out.work-*")), "the work folder is removed once the output is complete"


def test_every_input_format_in_input_order(tmp_path, tokenizer, wiki_docs, plays):
    folder = tmp_path / "texts" / "nested"
    folder.mkdir(parents=True)
    for i, act in enumerate(plays[:3]):  # plain text: one document per file, folders read in sorted order
        (folder / f"act{i}.txt").write_text(act, encoding="utf-8")
    json_file = tmp_path / "records.json"
    json_file.write_text(json.dumps([{"body": t} for t in wiki_docs[:5]]))
    parquet_file = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": wiki_docs[5:10], "n": list(range(5))}), parquet_file)
    gz_file = write_jsonl(tmp_path / "more.jsonl.gz", wiki_docs[10:15], key="body", opener=gzip.open)
    inputs = [json_file, parquet_file, tmp_path / "texts", gz_file]
    preprocess(LocalFiles(inputs, text_key="body"), tmp_path / "out", tokenizer, progress=False)
    expected = wiki_docs[:10] + plays[:3] + wiki_docs[10:15]
    assert read_back(tmp_path / "out") == reference_ids(tokenizer, expected)


def test_output_does_not_depend_on_workers_or_shard_size(tmp_path, tokenizer, wiki_docs, plays):
    docs = wiki_docs[:60] + plays[:6]
    preprocess(Texts("docs", docs), tmp_path / "a", tokenizer, workers=1, shard_docs=1000, progress=False)
    preprocess(Texts("docs", docs), tmp_path / "b", tokenizer, workers=2, shard_docs=7, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_spelled_special_tokens_stay_text(tmp_path, tokenizer):
    docs = ["A <|mask|> here and <|endoftext|> there <|pad|>.", "plain"]
    preprocess(Texts("tricky", docs), tmp_path / "out", tokenizer, progress=False)
    tokens = read_back(tmp_path / "out")
    for ids in tokens:
        assert ids[-1] == tokenizer.eod_id
        assert not {tokenizer.eod_id, tokenizer.pad_id, tokenizer.mask_id} & set(ids[:-1])
    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    assert hf.decode(tokens[0][:-1]) == docs[0]


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer, wiki_docs):
    path = tmp_path / "some_empty.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in [{"text": wiki_docs[0]}, {"text": ""}, {"text": "  \n"}, {}])
    )
    meta = preprocess(LocalFiles([path]), tmp_path / "out", tokenizer, progress=False).metadata
    assert (meta.documents, meta.skipped_documents) == (1, 3)
    assert read_back(tmp_path / "out") == reference_ids(tokenizer, wiki_docs[:1])


def test_second_run_is_up_to_date_and_leaves_files_alone(tmp_path, tokenizer, wiki_docs):
    source = LocalFiles([write_jsonl(tmp_path / "wiki.jsonl", wiki_docs[:30])])
    preprocess(source, tmp_path / "out", tokenizer, progress=False)
    stamps = [os.stat(tmp_path / f"out{s}").st_mtime_ns for s in (".bin", ".idx", ".json")]
    again = preprocess(source, tmp_path / "out", tokenizer, progress=False)
    assert again.up_to_date
    assert stamps == [os.stat(tmp_path / f"out{s}").st_mtime_ns for s in (".bin", ".idx", ".json")]


def test_output_from_other_input_needs_overwrite(tmp_path, tokenizer, wiki_docs):
    preprocess(Texts("a", wiki_docs[:5]), tmp_path / "out", tokenizer, progress=False)
    with pytest.raises(FileExistsError, match=r"out.*--overwrite"):
        preprocess(Texts("b", wiki_docs[5:10]), tmp_path / "out", tokenizer, progress=False)
    preprocess(Texts("b", wiki_docs[5:10]), tmp_path / "out", tokenizer, overwrite=True, progress=False)
    assert read_back(tmp_path / "out") == reference_ids(tokenizer, wiki_docs[5:10])


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist.*--input"):
        LocalFiles([tmp_path / "nope.jsonl"])


def test_empty_file_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty; remove it"):
        LocalFiles([tmp_path])


def test_non_utf8_file_names_the_file_the_offset_and_the_fix(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        ValueError, match=r"latin1\.jsonl is not valid UTF-8 \(bad byte at offset 28\).*iconv"
    ):
        preprocess(LocalFiles([path]), tmp_path / "out", tokenizer, progress=False)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
def test_missing_text_key_names_the_file_the_fields_and_the_flag(tmp_path, tokenizer, fmt):
    path = tmp_path / f"data.{fmt}"
    records = [{"content": "hello there"}, {"content": "general kenobi"}]
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    with pytest.raises(ValueError, match=rf"data\.{fmt}.*'text'.*content.*--text-key"):
        preprocess(LocalFiles([path]), tmp_path / "out", tokenizer, progress=False)


def test_unknown_format_is_refused(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"notes\.docx: unknown format"):
        LocalFiles([tmp_path / "notes.docx"])


def test_datasets_name_without_hub_gives_a_clear_error(tmp_path, tokenizer):
    from data.sources import HubDataset

    with pytest.raises(ValueError, match=r"could not load datasets name 'nobody/nothing'.*--input"):
        preprocess(HubDataset("nobody/nothing"), tmp_path / "out", tokenizer, progress=False)


def test_cli_writes_and_reports(tmp_path, tokenizer, wiki_docs, capsys):
    path = write_jsonl(tmp_path / "wiki.jsonl", wiki_docs[:20])
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer", tokenizer.path]
    assert preprocess_cli([*args, "--workers", "2", "--quiet"]) == 0
    assert "20 documents" in capsys.readouterr().out
    assert preprocess_cli([*args, "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert preprocess_cli(["--input", str(tmp_path / "missing.jsonl"), *args[2:]]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def _preprocess_in_own_session(docs, prefix, tokenizer):
    os.setsid()  # the test kills this process and its pool workers as one group
    preprocess(Texts("docs", docs), prefix, tokenizer, workers=2, shard_docs=3, progress=False)


def test_killed_run_resumes_to_identical_output(tmp_path, tokenizer, wiki_docs, plays):
    docs = wiki_docs[:200] + plays
    prefix = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(
        target=_preprocess_in_own_session, args=(docs, prefix, tokenizer)
    )
    child.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("killed.work-*/*.json")):  # the first finished shard
        assert child.is_alive() and time.monotonic() < deadline, "the run ended before a shard was done"
        time.sleep(0.001)
    os.killpg(child.pid, signal.SIGKILL)
    child.join()

    assert not (tmp_path / "killed.json").exists(), "a killed run must not look finished"
    done = len(list(tmp_path.glob("killed.work-*/*.json")))
    shards = -(-len(docs) // 3)
    assert 1 <= done < shards
    resumed = preprocess(Texts("docs", docs), prefix, tokenizer, workers=2, shard_docs=3, progress=False)
    assert (resumed.shards, resumed.shards_reused) == (shards, done)

    preprocess(Texts("docs", docs), tmp_path / "clean", tokenizer, workers=1, shard_docs=3, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"killed{suffix}").read_bytes() == (tmp_path / f"clean{suffix}").read_bytes()
    assert np.array_equal(
        np.concatenate([np.array(ids) for ids in read_back(prefix)]),
        np.concatenate([np.array(ids) for ids in reference_ids(tokenizer, docs)]),
    )
