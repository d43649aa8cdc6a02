"""scripts/bench_generate.py in a quick mode on a tiny random model with a records tokenizer: every
table is filled, its equalities hold against independent references (AR decoding, batch-1 decoding,
stock transformers, the records format), and the PNG, JSON and profile are written. Nothing is timed."""

from __future__ import annotations

import json

import pytest
import torch

import data.records as records
from data.tokenizer import load_tokenizer, train_tokenizer
from scripts import bench_generate as bench
from tests.factories import tiny_nld_model

pytestmark = pytest.mark.usefixtures("one_thread")  # hundreds of passes of a tiny model

QUICK = [
    "--prompt-set",
    "records",
    "--prompts",
    "2",
    "--max-new-tokens",
    "6",
    "--thresholds",
    "0.9,0.3",
    "--draft-steps",
    "2",
    "--draft-thresholds",
    "0.9",
    "--block-lengths",
    "2,4",
    "--batch-sizes",
    "1,2",
    "--compare-stock",
    "--profile",
    "self_spec",
]


@pytest.fixture(scope="module")
def records_tokenizer(tmp_path_factory):
    documents = records.records_corpus(seed=0, train_documents=120, valid_documents=2)["train"]
    info = train_tokenizer(documents, tmp_path_factory.mktemp("records") / "tokenizer", 400)
    return info, load_tokenizer(info.path)


@pytest.fixture(scope="module")
def quick_bench(records_tokenizer, tmp_path_factory):
    info, tokenizer = records_tokenizer
    model = tiny_nld_model(
        vocab_size=info.vocab_size,
        mask_token_id=info.mask_id,
        eos_token_id=info.eod_id,
        pad_token_id=info.pad_id,
        max_position_embeddings=512,
        block_size=4,
    )
    out = tmp_path_factory.mktemp("bench")
    args = bench.parser().parse_args(["--model", str(out), *QUICK, "--json", str(out / "bench.json")])
    with torch.no_grad():
        return bench.run_bench(model, tokenizer, args), out


def test_every_setting_is_measured_and_self_speculation_equals_ar(quick_bench):
    result, _ = quick_bench
    rows = result["rows"]
    assert list(rows) == [
        "ar",
        "diffusion t=0.9 B=4",
        "diffusion t=0.3 B=4",
        "self_spec B=4",
        "self_spec_fused B=4",
        "self_spec_fused redraft B=4",
        "self_spec steps=2 B=4",
        "self_spec t=0.9 B=4",
        "diffusion t=0.9 B=2",
        "self_spec B=2",
        "self_spec_fused B=2",
    ]
    # AR emits one token per pass (the prefill gives the first): TPF exactly 1.
    assert rows["ar"]["tpf"] == 1.0 and rows["ar"]["nfe"] == rows["ar"]["tokens"]
    for name, row in rows.items():
        assert row["tpf"] == row["tokens"] / row["nfe"] == row["tokens"] / sum(row["passes"].values()), name
        assert 0.0 <= row["valid_lines"] <= 1.0
        if row["mode"].startswith("self_spec"):
            assert row["prompts_equal_to_ar"] == 2, f"{name} is lossless at temperature 0"
            assert 0.0 <= row["accepted_share"] <= 1.0 and row["tokens_per_verify"] >= 1.0
    assert result["self_spec_equals_ar"] is True
    assert rows["self_spec_fused redraft B=4"]["options"] == {"redraft": True}


def test_batch_rows_equal_batch_one_and_stock_transformers_equals_our_ar(quick_bench):
    result, _ = quick_bench
    assert set(result["batch"]) == set(bench.BATCH_MODES)
    for mode, by_size in result["batch"].items():
        assert sorted(by_size) == [1, 2]
        for size, entry in by_size.items():
            assert entry["rows_equal_to_smallest_batch"] == 2, (mode, size)
            assert entry["tokens"] == sum(map(len, entry["outputs"]))
    # Stock LlamaForCausalLM.generate on the same weights is an independent greedy AR decoder.
    assert result["stock"]["outputs"] == result["rows"]["ar"]["outputs"]
    assert result["stock"]["prompts_equal_to_ar"] == 2


def test_the_json_png_and_profile_are_written(quick_bench):
    result, out = quick_bench
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"]["ar"]["outputs"] == result["rows"]["ar"]["outputs"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "profile_self_spec.txt").read_text()
    assert table.startswith("one self_spec B=4 decode of prompt 0") and "aten::" in table


def test_valid_line_share_judges_by_the_records_rules(records_tokenizer):
    _, tokenizer = records_tokenizer
    (prompt,) = bench.records_prompts(tokenizer, 1, seed=0, lines=3)
    document = records.held_out_documents(1, seed=0)[0]
    rest = document[len(prompt.text) :]
    true_continuation = tokenizer(rest, add_special_tokens=False)["input_ids"]
    assert bench.valid_line_share(tokenizer, [prompt], [true_continuation]) == 1.0
    first, others = rest.split("\n", 1)
    broken = first.replace(" | qty ", " | qty 1", 1) + "\n" + others  # qty 11-19: out of range
    broken_ids = tokenizer(broken, add_special_tokens=False)["input_ids"]
    lines = rest.count("\n")
    assert bench.valid_line_share(tokenizer, [prompt], [broken_ids]) == pytest.approx((lines - 1) / lines)


def test_records_prompts_are_encoded_as_the_tokenizer_does_with_the_document_start(records_tokenizer):
    info, tokenizer = records_tokenizer
    prompts = bench.records_prompts(tokenizer, 3, seed=0, lines=2)
    for prompt, document in zip(prompts, records.held_out_documents(3, seed=0), strict=True):
        assert document.startswith(prompt.text) and prompt.text.count("\n") == 2
        assert prompt.ids[0, 0] == info.eod_id
        assert prompt.ids[0, 1:].tolist() == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]


def test_modes_are_chosen_with_ar_always_kept_as_the_reference():
    args = bench.parser().parse_args(["--model", "x", "--modes", "self_spec,ar"])
    assert args.modes == ["ar", "self_spec"]
    with pytest.raises(SystemExit):
        bench.main(["--model", "x", "--modes", "beam"])
