"""The generated records corpus: reproducible, split by whole documents, its rules kept and checked,
and written where configs/data/records.yaml and experiment=records_demo read it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import data.records as records
from data.config import DataConfig
from data.dataset import check_data
from data.metadata import DatasetMetadata

RECORDS_YAML = Path(__file__).resolve().parents[2] / "configs" / "data" / "records.yaml"


def test_the_generator_is_deterministic_for_a_seed_and_differs_across_seeds():
    first = records.records_corpus(seed=3, train_documents=40, valid_documents=5)
    assert records.records_corpus(seed=3, train_documents=40, valid_documents=5) == first
    other = records.records_corpus(seed=4, train_documents=40, valid_documents=5)
    assert not set(first["train"]) & set(other["train"])
    assert not set(first["valid"]) & set(other["valid"])


def test_train_and_valid_are_disjoint_whole_documents_independent_of_the_training_size():
    small = records.records_corpus(seed=0, train_documents=50, valid_documents=20)
    large = records.records_corpus(seed=0, train_documents=400, valid_documents=20)
    assert small["valid"] == large["valid"] == records.held_out_documents(20, seed=0)
    assert large["train"][:50] == small["train"]
    assert not set(large["train"]) & set(large["valid"])
    assert len(set(large["train"])) == 400


def test_catalogue_fields_are_a_function_of_the_item_and_lines_count_to_the_header():
    # Parsed here by splitting on the separators, independently of the module's own checker.
    seen: dict[str, tuple[str, ...]] = {}
    for document in records.records_corpus(seed=1, train_documents=300, valid_documents=1)["train"]:
        header, *body, footer, end = document.split("\n")
        assert end == "" and document.endswith("\n")
        ledger_part, _store, _week, count_part = header.split(" | ")
        ledger, (count, unit) = ledger_part.removeprefix("ledger "), count_part.split(" ")
        assert unit == "lines" and len(body) == int(count)
        assert records.MIN_LINES <= len(body) <= records.MAX_LINES
        assert footer == f"end of ledger {ledger}"
        for number, line in enumerate(body, start=1):
            fields = line.split(" | ")
            assert fields[0] == f"{number:02d}" and len(fields) == 7
            item, attributes, quantity = fields[1], tuple(fields[2:6]), fields[6]
            assert seen.setdefault(item, attributes) == attributes, f"{item} has two sets of fields"
            assert quantity.startswith("qty ") and 1 <= int(quantity[4:]) <= records.MAX_QUANTITY
    assert len(seen) == len(records.CATALOGUE) == 48, "300 documents use every item"
    assert len({a[2] for a in seen.values()}) > 30, "prices differ between items"


def test_items_follow_catalogue_order_with_rare_skips_and_never_come_round_again():
    names = list(records.CATALOGUE)
    steps = []
    for document in records.records_corpus(seed=5, train_documents=400, valid_documents=1)["train"]:
        items = [line.split(" | ")[1] for line in document.split("\n")[1:-2]]
        places = [names.index(item) for item in items]
        advance = [(b - a) % len(names) for a, b in itertools.pairwise(places)]
        assert min(advance) >= 1 and sum(advance) < len(names), "no item twice in a ledger"
        steps += advance
    skipped = sum(step - 1 for step in steps) / (sum(steps))  # items passed over / items passed
    assert abs(skipped - records.SKIP) < 0.01, skipped


def test_generated_documents_and_their_openings_keep_every_rule():
    documents = records.records_corpus(seed=2, train_documents=200, valid_documents=10)
    for document in documents["train"] + documents["valid"]:
        results = records.check_records(document)
        assert results == [None] * document.count("\n")
    prompt = records.opening(documents["valid"][0], lines=3)
    assert documents["valid"][0].startswith(prompt) and prompt.count("\n") == 3
    assert records.check_records(prompt) == [None] * 3


def test_check_records_names_the_broken_rule():
    document = records.held_out_documents(1, seed=0)[0]
    lines = document.split("\n")
    item = records.CATALOGUE[lines[1].split(" | ")[1]]

    def problems(edited: list[str]) -> list[tuple[int, str]]:
        return [(i, p) for i, p in enumerate(records.check_records("\n".join(edited))) if p is not None]

    wrong_price = [*lines]
    wrong_price[1] = wrong_price[1].replace(f" | {item.price} | ", " | 9.99 | ")
    assert problems(wrong_price) == [(1, f"{item.name}: price '9.99', the catalogue says '{item.price}'")]
    skipped = [lines[0], *lines[2:]]
    assert problems(skipped)[0] == (1, "line number 02, expected 01")
    swapped = [lines[0], lines[2].replace("02 | ", "01 | ", 1), lines[1].replace("01 | ", "02 | ", 1)]
    later, earlier = swapped[1].split(" | ")[1], swapped[2].split(" | ")[1]
    assert problems([*swapped, ""]) == [(2, f"{earlier} does not come after {later} in catalogue order")]
    no_footer = [*lines[:-2], "01 | " + lines[1].split(" | ", 1)[1], ""]
    assert problems(no_footer)[-1][1].startswith("expected the footer 'end of ledger")
    after_footer = records.check_records(document + "more\n")[-1]
    assert after_footer == "a line after the footer; the document should have ended"
    assert records.check_records("01 | pear\n")[0].startswith("not a header 'ledger NNNN | store NAME")


def records_config() -> DataConfig:
    raw = OmegaConf.load(RECORDS_YAML)
    assert list(raw.pop("defaults")) == ["data_schema", "_self_"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))


def test_prepare_records_writes_what_records_yaml_reads_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv(records.RECORDS_DIR_ENV, str(tmp_path / "records"))
    prepared = records.prepare_records(
        seed=0, train_documents=120, valid_documents=6, vocab_size=400, workers=1, progress=False
    )
    cfg = records_config()
    assert [Path(p) for p in cfg.prefixes] == [prepared.train]
    assert [Path(p) for p in cfg.valid_prefixes] == [prepared.valid]
    assert Path(cfg.tokenizer) == prepared.tokenizer
    metadata = check_data(cfg, vocab_size=400, mask_id=2)
    assert [m.documents for m in metadata.values()] == [120, 6]
    assert {m.tokenizer.fingerprint for m in metadata.values()} == {
        DatasetMetadata.read(prepared.train).tokenizer.fingerprint
    }

    stamps = {p: p.stat().st_mtime_ns for p in prepared.root.rglob("*")}
    again = records.prepare_records(
        seed=0, train_documents=120, valid_documents=6, vocab_size=400, workers=1, progress=False
    )
    assert again == prepared
    assert stamps == {p: p.stat().st_mtime_ns for p in prepared.root.rglob("*")}, "nothing rewritten"

    records.prepare_records(
        seed=1, train_documents=80, valid_documents=6, vocab_size=400, workers=1, progress=False
    )
    assert DatasetMetadata.read(prepared.train).documents == 80
    assert DatasetMetadata.read(prepared.train).source["seed"] == 1


def test_a_vocabulary_the_corpus_cannot_fill_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"yields only \d+ BPE tokens; ask for vocab_size <= that"):
        records.prepare_records(
            tmp_path, train_documents=5, valid_documents=1, vocab_size=4096, progress=False
        )


def test_the_records_demo_recipe_composes_onto_the_records_data():
    from train.config import compose_config
    from train.objectives import ObjectiveKind

    cfg = compose_config(["experiment=records_demo"])
    assert cfg.objective.kind is ObjectiveKind.joint
    assert cfg.model.vocab_size == records.VOCAB_SIZE, "the recipe's model fits the prepared tokenizer"
    assert cfg.data.prefixes == [f"{records.default_records_dir()}/records_train"]
    assert cfg.data.valid_prefixes == [f"{records.default_records_dir()}/records_valid"]
    assert cfg.data.seq_length % cfg.objective.block_size == 0
    assert cfg.run_dir == "runs/records_demo"
