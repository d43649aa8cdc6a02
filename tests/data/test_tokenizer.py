"""The BPE we train, loading any tokenizer folder, and how a mask id is chosen."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.tokenizer import EOD_TOKEN, MASK_TOKEN, PAD_TOKEN, load_tokenizer_info, train_tokenizer


def test_trained_folder_loads_with_auto_tokenizer_and_reserves_low_ids(tokenizer):
    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    assert [hf.convert_ids_to_tokens(i) for i in range(3)] == [EOD_TOKEN, PAD_TOKEN, MASK_TOKEN]
    assert (hf.eos_token, hf.pad_token, hf.mask_token) == (EOD_TOKEN, PAD_TOKEN, MASK_TOKEN)
    assert (tokenizer.eod_id, tokenizer.pad_id, tokenizer.mask_id) == (0, 1, 2)
    assert tokenizer.vocab_size == len(hf) == 768
    assert tokenizer.mask_source == "mask_token"
    assert {tokenizer.eod_id, tokenizer.mask_id, tokenizer.pad_id} <= set(hf.all_special_ids)


def test_special_ids_never_come_from_ordinary_text(tokenizer, wiki_docs, plays):
    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    special = {tokenizer.eod_id, tokenizer.pad_id, tokenizer.mask_id}
    for text in wiki_docs + plays:
        ids = hf.encode(text, add_special_tokens=False)
        assert not special & set(ids)
        assert hf.decode(ids) == text  # byte-level: lossless


def test_training_is_deterministic(tmp_path, wiki_docs):
    a = train_tokenizer(wiki_docs[:100], tmp_path / "a", 400)
    b = train_tokenizer(wiki_docs[:100], tmp_path / "b", 400)
    assert a.fingerprint == b.fingerprint


def test_vocab_size_below_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["some text"], tmp_path / "t", 100)


def test_missing_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*prepare_demo_data\.py"):
        load_tokenizer_info(tmp_path / "nowhere")


@pytest.fixture
def no_mask_tokenizer(tmp_path, wiki_docs):
    """A folder like an imported checkpoint's: eos, a few reserved specials, no mask token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    reserved = ["</s>", "<SPECIAL_1>", "<SPECIAL_2>"]
    bpe.train_from_iterator(wiki_docs[:50], trainers.BpeTrainer(vocab_size=400, special_tokens=reserved))
    folder = tmp_path / "imported"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(folder)
    return folder


def test_tokenizer_without_mask_token_asks_for_a_reserved_id(no_mask_tokenizer):
    with pytest.raises(ValueError, match=r"no mask token.*--mask-id.*\[1, 2\]"):
        load_tokenizer_info(no_mask_tokenizer)


def test_reserved_id_is_recorded_as_the_mask(no_mask_tokenizer):
    info = load_tokenizer_info(no_mask_tokenizer, mask_id=2)
    assert (info.mask_id, info.mask_source, info.eod_id, info.pad_id) == (2, "reserved_id", 0, None)


@pytest.mark.parametrize("mask_id", [0, 300])  # the eos token; an ordinary BPE token
def test_mask_id_that_text_could_produce_is_refused(no_mask_tokenizer, mask_id):
    with pytest.raises(ValueError, match=f"mask_id={mask_id} is not a free reserved special token"):
        load_tokenizer_info(no_mask_tokenizer, mask_id=mask_id)


def test_encoded_text_starts_at_a_document_boundary_and_preprocessing_adds_none(
    tokenizer, tmp_path, wiki_docs
):
    """``tokenizer(text)`` puts EOD in front (documents followed an EOD in training), so the CLI and stock
    transformers encode a prompt alike; the indexed data holds each document once, EOD after it only."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.preprocess import preprocess
    from data.sources import Texts
    from data.tokenizer import starts_at_a_document_boundary

    hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    text = wiki_docs[0][:200]
    assert hf(text)["input_ids"] == [tokenizer.eod_id, *hf.encode(text, add_special_tokens=False)]
    assert starts_at_a_document_boundary(tokenizer.path)
    preprocess(Texts("one", [text]), tmp_path / "one", tokenizer, progress=False)
    documents = IndexedDataset(str(tmp_path / "one"))
    assert len(documents) == 1
    assert np.asarray(documents[0]).tolist() == [*hf.encode(text, add_special_tokens=False), tokenizer.eod_id]
