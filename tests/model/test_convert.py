"""Streaming conversion (train/convert.py, model/hf/safetensors_io.py): the export reads a torch_dist
checkpoint a tensor at a time and writes exactly the weights of the model (saved at TP=1 or TP=2),
never building a Megatron model nor touching CUDA; the import writes a checkpoint that the trainer
loads at TP=1 and TP=2, and import then export gives the same weights bit for bit.

Run as a script under torchrun (2 processes), this file is the worker that makes the parallel
checkpoints: a fresh TP=2 model (``--save``), a checkpoint loaded at TP=2 and saved again
(``--reshard SRC DST``), and a fresh PP=2 model (``--save-pp2``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from model import cpu
from model.config import ModelConfig, ParallelConfig, PrecisionConfig
from model.hf import keymap
from model.hf.config_json import MODEL_TYPE
from model.megatron import build_model
from tests.conftest import run_ranks
from tests.factories import tiny_llama_folder, tiny_model
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.convert import export_checkpoint, find_checkpoint, import_hf, load_megatron_state
from train.objectives import ObjectiveConfig

# The tiny model of these tests: 2 layers, a vocabulary padded from 300 to 384 rows, QK-norm on.
TINY = dict(name="convert-test", max_position_embeddings=128, qk_layernorm=True)


def _config_yaml(model_cfg: ModelConfig) -> str:
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model, cfg.objective = model_cfg, ObjectiveConfig(block_size=8, mask_token_id=2)
    return OmegaConf.to_yaml(cfg)


def two_ranks(tokenizer: Path, save: Path, reshard: tuple[Path, Path], save_pp2: Path) -> None:
    """One of two gloo ranks: a random model saved at TP=2 (``save``), the checkpoint ``reshard[0]``
    loaded at TP=2 and saved again (``reshard[1]``), a random model saved at PP=2 (``save_pp2``)."""
    cpu.enable()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2, 1)
    model_cfg = tiny_model(**TINY)
    torch.manual_seed(5)
    model = build_model(model_cfg, ParallelConfig(tensor=2), PrecisionConfig())
    ckpt.save(save, [model], None, ckpt.TrainState(), _config_yaml(model_cfg), tokenizer=tokenizer)

    info = find_checkpoint(reshard[0])
    model = build_model(info.model, ParallelConfig(tensor=2), PrecisionConfig())
    loaded = ckpt.load(info.folder.parent, [model], None, weights_only=True, only=info.folder)
    assert loaded is not None, f"could not load {info.folder} at TP=2"
    config_yaml = (info.folder / "config.yaml").read_text()
    ckpt.save(reshard[1], [model], None, ckpt.TrainState(), config_yaml, tokenizer=info.tokenizer)

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 2)
    torch.manual_seed(6)
    stage = build_model(model_cfg, ParallelConfig(pipeline=2), PrecisionConfig())  # one layer each
    config_yaml = _config_yaml(model_cfg)
    ckpt.save(save_pp2, [stage], None, ckpt.TrainState(), config_yaml, tokenizer=info.tokenizer)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


NLD = keymap.LAYOUTS[MODEL_TYPE]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The exported tensors, read by safetensors itself (an independent reader of our writer)."""
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else None
    state = {}
    for name in files or ["model.safetensors"]:
        state.update(load_file(str(folder / name)))
    return state


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), got.keys() ^ expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def old_path(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the export wrote before streaming: a whole Megatron model's state dict, renamed, cast."""
    info = find_checkpoint(checkpoint)
    state = keymap.to_hf(load_megatron_state(info), info.model, NLD)
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    texts = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]
    train_tokenizer(texts, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def tp1(megatron_single, tokenizer, tmp_path_factory):
    """(model, checkpoint root) of a random tiny model saved at TP=1."""
    root = tmp_path_factory.mktemp("tp1") / "ckpt"
    model_cfg = tiny_model(**TINY)
    torch.manual_seed(0)
    model = build_model(model_cfg, ParallelConfig(), PrecisionConfig()).eval()
    ckpt.save(root, [model], None, ckpt.TrainState(), _config_yaml(model_cfg), tokenizer=tokenizer)
    return model, root


@pytest.fixture(scope="module")
def tp1_export(tp1, tmp_path_factory) -> Path:
    return export_checkpoint(tp1[1], tmp_path_factory.mktemp("tp1_hf") / "hf", dtype="float32")


@pytest.fixture(scope="module")
def imported(tp1_export, tmp_path_factory) -> Path:
    return import_hf(tp1_export, tmp_path_factory.mktemp("imported") / "ckpt")


@pytest.fixture(scope="module")
def tp2(imported, tokenizer, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a fresh model saved at TP=2, the imported checkpoint loaded and saved again at TP=2, a fresh
    model saved at PP=2)."""
    root = tmp_path_factory.mktemp("tp2")
    fresh, resharded, pp2 = root / "fresh", root / "resharded", root / "pp2"
    run_ranks(partial(two_ranks, tokenizer, fresh, (imported, resharded), pp2), 2, root / "ranks")
    return fresh, resharded, pp2


def test_export_writes_the_models_own_weights(tp1, tp1_export):
    model, _ = tp1
    model_cfg = tiny_model(**TINY)
    got = weights(tp1_export)
    assert_identical(got, keymap.to_hf(keymap.without_extra_state(model.state_dict()), model_cfg, NLD))
    assert got["encoder.embed_tokens.weight"].shape == (model_cfg.vocab_size, model_cfg.hidden_size)
    assert json.loads((tp1_export / "config.json").read_text())["dtype"] == "float32"


def test_export_of_tp2_and_pp2_checkpoints_equals_the_whole_model_path(tp2, tmp_path):
    fresh, _, pp2 = tp2
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        out = export_checkpoint(fresh, tmp_path / name, dtype=name)
        assert_identical(weights(out), old_path(fresh, dtype))
    out = export_checkpoint(pp2, tmp_path / "pp2", dtype="float32")
    assert_identical(weights(out), old_path(pp2, torch.float32))


def test_bf16_export_is_the_rounded_fp32_weights(tp1, tmp_path):
    _, root = tp1
    out = export_checkpoint(root, tmp_path / "bf16", dtype="bfloat16")
    assert_identical(weights(out), old_path(root, torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_export_has_an_index_and_the_same_weights(tp1, monkeypatch, tmp_path):
    from model.hf import safetensors_io

    _, root = tp1
    monkeypatch.setattr(safetensors_io, "SHARD_SIZE", "100KB")  # the tiny model's 1.3 MB in many files
    out = export_checkpoint(root, tmp_path / "sharded", dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and {p.name for p in out.glob("*.safetensors")} == files
    assert_identical(weights(out), old_path(root, torch.float32))


def test_export_builds_no_megatron_model_and_never_touches_cuda(tp1, monkeypatch, tmp_path):
    import megatron.core.models.gpt

    import model.megatron
    import train.convert

    def refuse(*args, **kwargs):
        raise AssertionError("the export built a Megatron model or initialised CUDA")

    _, root = tp1
    expected = old_path(root, torch.float32)
    monkeypatch.setattr(megatron.core.models.gpt.GPTModel, "__init__", refuse)
    monkeypatch.setattr(model.megatron, "build_model", refuse)
    monkeypatch.setattr(train.convert, "build_model", refuse)
    # As on a GPU machine: CUDA "available", but any use of it fails.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    with cpu.unpatched():
        out = export_checkpoint(root, tmp_path / "no_model", dtype="float32")
    assert_identical(weights(out), expected)


def test_import_then_export_is_bit_identical(tp1_export, imported, tmp_path):
    again = export_checkpoint(imported, tmp_path / "again", dtype="float32")
    assert_identical(weights(again), weights(tp1_export))


def test_bf16_import_stores_bf16_and_round_trips(tp1, tmp_path):
    _, root = tp1
    hf = export_checkpoint(root, tmp_path / "hf16", dtype="bfloat16")
    back = import_hf(hf, tmp_path / "ckpt16")
    info = find_checkpoint(back)
    saved = FileSystemReader(str(info.folder)).read_metadata().state_dict_metadata
    assert saved["decoder.layers.mlp.linear_fc1.weight"].properties.dtype == torch.bfloat16
    assert info.precision.dtype.value == "bf16"
    again = export_checkpoint(back, tmp_path / "again16")
    assert_identical(weights(again), weights(hf))


def test_imported_checkpoint_loads_in_the_trainer_at_tp1_and_tp2(tp1, imported, tp2, tmp_path):
    model, _ = tp1
    vocab = tiny_model().vocab_size
    original = keymap.without_extra_state(model.state_dict())
    loaded = load_megatron_state(find_checkpoint(imported))  # ckpt.load into a TP=1 model
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():  # HF drops the padding rows; the import pads with zeros
        rows = vocab if name in ("embedding.word_embeddings.weight", "output_layer.weight") else None
        assert torch.equal(loaded[name][:rows], tensor[:rows]), name
    _, resharded, _ = tp2  # ckpt.load at TP=2, then saved at TP=2 again
    out = export_checkpoint(resharded, tmp_path / "resharded", dtype="float32")
    assert_identical(weights(out), keymap.to_hf(original, tiny_model(**TINY), NLD))


def test_meta_layout_is_the_layout_of_build_model(megatron_single):
    """The import's meta-device model saves under exactly the keys, shapes and offsets of the
    model the trainer builds."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from model.config import Dtype
    from train.convert import _meta_sharded_state

    model_cfg = tiny_model(**TINY)
    built = build_model(model_cfg, ParallelConfig(), PrecisionConfig()).sharded_state_dict()
    meta = _meta_sharded_state(model_cfg, Dtype.fp32)
    assert meta.keys() == built.keys()

    def layout(item):
        if isinstance(item, ShardedTensor):
            return item.key, item.global_shape, item.global_offset, item.replica_id, tuple(item.data.shape)
        if isinstance(item, ShardedTensorFactory):
            return item.key, tuple(item.data.shape), item.replica_id
        assert isinstance(item, ShardedObject), type(item)
        return item.key, item.global_shape, item.global_offset

    for name in built:
        assert layout(meta[name]) == layout(built[name]), name
        if isinstance(meta[name], ShardedTensor | ShardedTensorFactory):
            assert meta[name].data.is_meta, name


def test_a_new_mask_token_inside_unused_embedding_rows_keeps_them(megatron_single, tmp_path):
    """A source whose embedding has more rows than its tokenizer (Qwen-style): the new mask token
    takes the first free row, every row stays, and the mask rows are the mean embedding."""
    source = tiny_llama_folder(tmp_path / "src", vocab_size=256, tie_word_embeddings=False)
    info = find_checkpoint(import_hf(tmp_path / "src", tmp_path / "ckpt"))
    assert (info.model.vocab_size, info.objective.mask_token_id) == (256, 250)
    state = load_megatron_state(info)
    embedding = source.model.embed_tokens.weight.detach()
    mean = embedding.mean(dim=0)
    for name, original in (
        ("embedding.word_embeddings.weight", embedding),
        ("output_layer.weight", source.lm_head.weight.detach()),
    ):
        rows = state[name]
        assert torch.equal(rows[250], mean), name
        keep = [i for i in range(256) if i != 250]
        assert torch.equal(rows[keep], original[keep]), name


def test_export_refuses_bad_input_and_leaves_no_temporary_folder(tp1, tmp_path):
    _, root = tp1
    with pytest.raises(ValueError, match="dtype='int8'; allowed: float32, bfloat16, float16"):
        export_checkpoint(root, tmp_path / "bad", dtype="int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_checkpoint(root, tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="no complete Tandem checkpoint"):
        export_checkpoint(tmp_path / "taken", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
