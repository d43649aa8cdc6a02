"""Checkpoints to and from Hugging Face folders in the Nemotron-Labs-Diffusion (NLD) format.

``export_checkpoint``: a Tandem dist checkpoint saved at any TP/PP -> ``config.json`` (architecture
``NemotronLabsDiffusionModel``), safetensors with NLD weight names, the tokenizer, and Tandem's remote
code (``model.hf.REMOTE_CODE``: the model, its decoders, and the mask, RoPE and noise modules it
trains with).
``import_hf``: an NLD folder or a Llama / Mistral / Ministral-3 / Qwen3 causal LM -> a Tandem
checkpoint (weights only) that the trainer starts from with ``checkpoint.load=... checkpoint.finetune=true``.
Both write to a temporary folder and rename it when complete.

Both stream, so that 8B/14B conversions fit beside one copy of the weights: the export reads the
checkpoint's tensors one at a time from its torch.distributed.checkpoint files (no Megatron model,
no process group, no GPU), converts each (``model.hf.keymap``), casts it and appends it to its
safetensors shard (``model.hf.safetensors_io``); the import reads the source safetensors a tensor at
a time and hands the converted tensors to megatron.core's dist-checkpoint writer under the keys of a
Megatron model built on the meta device. ``load_megatron_state`` is the other way to read a
checkpoint: through a whole Megatron model, as the trainer does (the tests' reference).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from model.config import Dtype, ModelConfig, ParallelConfig, PrecisionConfig, TransformerImpl
from model.hf import REMOTE_CODE, keymap
from model.hf.config_json import HF_DTYPES, MODEL_TYPE, model_from_hf, nld_config, nld_objective
from model.hf.safetensors_io import SafetensorsSource, write_safetensors
from model.megatron import build_model
from train import checkpoint as ckpt
from train.config import Environment, TrainConfig, to_yaml, validate
from train.objectives import ObjectiveConfig


@dataclass
class CheckpointInfo:
    folder: Path  # the iter_* folder
    model: ModelConfig
    objective: ObjectiveConfig
    precision: PrecisionConfig
    tokenizer: Path


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """The newest checkpoint under ``path`` (a run folder, its checkpoints/, or an iter_* folder),
    verified in full (sizes and checksums). A damaged one is a ``CheckpointUnreadable`` naming it and
    the older ones that are intact: an export never falls back to an older checkpoint unasked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / ckpt.MANIFEST).is_file() or ckpt.step_of(path) is not None:
        folders = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        folders = ckpt.candidates(root)
    if not folders:
        raise FileNotFoundError(
            f"no complete Tandem checkpoint under {path} (looked for iter_*/ folders with {ckpt.MANIFEST}); "
            "give a run folder, its checkpoints/ folder or one iter_* folder"
        )
    problem = ckpt.verify(folders[0], checksums=True)
    if problem is None:
        return _read_info(folders[0])
    intact = [f.name for f in folders[1:] if ckpt.verify(f) is None]
    hint = f"; to export an older one name its folder, e.g. --checkpoint {folders[0].parent / intact[0]}"
    raise ckpt.CheckpointUnreadable(f"{folders[0]} is damaged: {problem}" + (hint if intact else ""))


def _read_info(folder: Path) -> CheckpointInfo:
    try:
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(folder / "config.yaml"))
        model = OmegaConf.to_object(saved.model)
        objective = OmegaConf.to_object(saved.objective)
        precision = OmegaConf.to_object(saved.precision)
    except Exception as err:  # OmegaConf and YAML raise many types for a damaged file
        raise ckpt.CheckpointUnreadable(f"{folder / 'config.yaml'} is unreadable: {err}") from err
    tokenizer = folder.parent / ckpt.TOKENIZER
    if not tokenizer.is_dir():
        raise FileNotFoundError(
            f"{tokenizer} is missing: the checkpoint root keeps a copy of the run's tokenizer; copy the "
            "tokenizer folder the run trained with there"
        )
    _check_tokenizer_copy(tokenizer, ckpt.manifest_of(folder).get("tokenizer_fingerprint"))
    return CheckpointInfo(folder, model, objective, precision, tokenizer)


def _check_tokenizer_copy(tokenizer: Path, fingerprint: str | None) -> None:
    """``CheckpointUnreadable`` when the checkpoint's tokenizer copy does not load, or is not the one
    the run trained with (the manifest's fingerprint)."""
    from data.tokenizer import load_tokenizer_info

    fix = "copy the tokenizer folder the run trained with there"
    try:
        info = load_tokenizer_info(tokenizer)
    except Exception as err:  # tokenizers and transformers raise many types for a damaged file
        raise ckpt.CheckpointUnreadable(
            f"the tokenizer copy {tokenizer} does not load: {err}; {fix}"
        ) from None
    if fingerprint and info.fingerprint != fingerprint:
        raise ckpt.CheckpointUnreadable(
            f"the tokenizer copy {tokenizer} is not the tokenizer the checkpoint was trained with (its "
            f"fingerprint differs from {ckpt.MANIFEST}'s); {fix}"
        )


def load_megatron_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Whole (TP = PP = 1) local-spec weights of a checkpoint saved at any layout, read the trainer's
    way: into a whole fp32 Megatron model (memory: the model and its copy). Conversions stream through
    ``SavedTensors`` instead; this is their independent reference."""
    from train.distributed import single_process

    model_cfg = _local(info.model)
    with single_process():
        model = build_model(model_cfg, ParallelConfig(), PrecisionConfig())
        loaded = ckpt.load(info.folder.parent, [model], None, weights_only=True, only=info.folder)
        if loaded is None:
            raise RuntimeError(f"could not load {info.folder}")
        return {k: v.detach().cpu() for k, v in keymap.without_extra_state(model.state_dict()).items()}


def _local(model: ModelConfig) -> ModelConfig:
    # Conversion runs with megatron.core's own layers; dist checkpoints share keys across specs.
    return dataclasses.replace(model, transformer_impl=TransformerImpl.local)


def _atomic_folder(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    # mkdtemp and safetensors create owner-only files; give the folder the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class _MetadataOnce(FileSystemReader):
    """A reader that unpickles the metadata once: torch.distributed.checkpoint reads it on every load,
    an export loads once per tensor, and a checkpoint with optimizer states has a large metadata file."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _BoxPlanner(DefaultLoadPlanner):
    """Plans the reads of one box (``offsets`` + ``target``'s shape) of one saved tensor into
    ``target``, from whichever stored chunks overlap it: that is what makes any TP/PP layout read as
    whole tensors."""

    def __init__(self, key: str, offsets: tuple[int, ...], target: torch.Tensor):
        super().__init__()
        self.key, self.offsets, self.target = key, offsets, target

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.target.shape)
        saved = self.metadata.state_dict_metadata[self.key]
        reads = create_read_items_for_chunk_list(self.key, saved, [box])
        covered = sum(math.prod(read.lengths) for read in reads)
        if covered != self.target.numel():
            raise ValueError(
                f"the stored chunks of {self.key!r} cover {covered} of the {self.target.numel()} values "
                f"at offsets {self.offsets}: the checkpoint is incomplete"
            )
        return LoadPlan(reads)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.target


class SavedTensors:
    """The model tensors of a torch_dist checkpoint folder (megatron.core dist_checkpointing), read
    whole, one ``keymap.Entry`` at a time, without a model or a process group; optimizer states and
    the other saved objects are never read."""

    def __init__(self, folder: Path, num_layers: int):
        self.folder, self.num_layers = folder, num_layers
        self._reader = _MetadataOnce(str(folder))
        self._saved = self._reader.read_metadata().state_dict_metadata

    def _metadata(self, entry: keymap.Entry) -> TensorStorageMetadata:
        saved = self._saved.get(entry.checkpoint_key)
        if not isinstance(saved, TensorStorageMetadata):
            model_keys = sorted(k for k, v in self._saved.items() if isinstance(v, TensorStorageMetadata))
            raise KeyError(
                f"{self.folder} stores no tensor {entry.checkpoint_key!r} (for {entry.megatron}); it has "
                f"{', '.join(model_keys[:8])}{', ...' if len(model_keys) > 8 else ''}. Was it saved by "
                "Tandem's trainer or import (megatron.core torch_dist), with the model config beside it?"
            )
        if entry.layer is not None and saved.size[0] != self.num_layers:
            raise ValueError(
                f"{self.folder} stacks {saved.size[0]} layers under {entry.checkpoint_key!r}, but its "
                f"config.yaml says num_layers={self.num_layers}"
            )
        return saved

    def placeholder(self, entry: keymap.Entry, dtype: torch.dtype) -> torch.Tensor:
        """An empty meta tensor with the shape of ``entry``'s whole tensor."""
        size = self._metadata(entry).size
        return torch.empty(size[1:] if entry.layer is not None else size, dtype=dtype, device="meta")

    def read(self, entry: keymap.Entry, dtype: torch.dtype) -> torch.Tensor:
        """``entry``'s whole tensor, cast to ``dtype`` (while it is copied out of the stored chunks)."""
        size = self._metadata(entry).size
        if entry.layer is None:
            target = torch.empty(size, dtype=dtype)
            offsets = (0,) * len(size)
        else:
            target = torch.empty((1, *size[1:]), dtype=dtype)  # [1, ...]: one layer of the stack
            offsets = (entry.layer,) + (0,) * (len(size) - 1)
        with warnings.catch_warnings():
            # One process reading files is the intent here; torch warns that it assumes so.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            planner = _BoxPlanner(entry.checkpoint_key, offsets, target)
            dcp_load({}, storage_reader=self._reader, planner=planner, no_dist=True)
        return target[0] if entry.layer is not None else target


def _export_weights(saved: SavedTensors, cfg: ModelConfig, dtype: torch.dtype, folder: Path) -> None:
    """The export's safetensors, streamed from the checkpoint (memory: the largest tensor, not the model)."""
    entries = keymap.entries(cfg, keymap.LAYOUTS[MODEL_TYPE])
    planned: dict[str, torch.Tensor] = {}
    for entry in entries:  # the conversion run on meta tensors: names, shapes and order, no data
        planned.update(keymap.entry_to_hf(entry, saved.placeholder(entry, dtype), cfg))
    converted = (
        item for entry in entries for item in keymap.entry_to_hf(entry, saved.read(entry, dtype), cfg).items()
    )
    write_safetensors(folder, planned, converted)


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the NLD-format Hugging Face folder of a Tandem checkpoint; returns ``out``."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer_info

    info = find_checkpoint(checkpoint)
    validate(
        TrainConfig(model=info.model, objective=info.objective, precision=info.precision),
        environment=Environment(),
    )
    out = Path(out)
    dtype = dtype or ("bfloat16" if info.precision.dtype is Dtype.bf16 else "float32")
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(HF_DTYPES)}")
    tokenizer_info = load_tokenizer_info(info.tokenizer)
    mask_id = (
        info.objective.mask_token_id if info.objective.mask_token_id is not None else tokenizer_info.mask_id
    )
    saved = SavedTensors(info.folder, info.model.num_layers)
    tokenizer = AutoTokenizer.from_pretrained(str(info.tokenizer))
    config = nld_config(
        info.model,
        info.objective,
        mask_token_id=mask_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    tmp = _atomic_folder(out, overwrite)
    try:
        _export_weights(saved, info.model, HF_DTYPES[dtype], tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        for name, source in REMOTE_CODE.items():
            shutil.copyfile(source, tmp / name)
        (tmp / "tandem_export.json").write_text(
            json.dumps({"checkpoint": str(info.folder.resolve()), "dtype": dtype}, indent=2) + "\n"
        )
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    mask_token_id: int | None = None,
    block_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Hugging Face causal LM (or NLD export) into a Tandem weights-only checkpoint at ``out``.

    The mask token is the source's own (NLD ``mask_token_id``, or the tokenizer's mask token), else
    ``mask_token_id``, else a new ``<|mask|>`` token appended to the vocabulary (its embedding and head
    rows initialised to the mean embedding). A tied source head becomes an untied head initialised from
    the embedding. ``tp``/``pp`` are checked against the shapes; torch_dist checkpoints reshard on load,
    so the folder serves any layout. The weights are stored in bf16 when the source is all bf16, else
    in fp32; memory: one copy of them."""
    from transformers import AutoTokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: give a Hugging Face model folder")
    hf = json.loads(config_file.read_text())
    model = model_from_hf(hf, name=hf_dir.name)
    source_vocab = model.vocab_size
    nld = hf.get("model_type") == MODEL_TYPE
    layout = keymap.LAYOUTS[MODEL_TYPE if nld else "llama"]
    source = SafetensorsSource(hf_dir)
    source.check_sizes(layout, model)
    tied = bool(hf.get("tie_word_embeddings", False)) and layout.head not in source
    # A tokenizer needs no remote code; left unsaid, transformers asks on the terminal whether to run
    # an NLD export's modeling code (and waits for an answer).
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    mask_id = hf.get("mask_token_id") if nld else mask_token_id
    if mask_id is None and tokenizer.mask_token_id is not None:
        mask_id = tokenizer.mask_token_id
    added_mask = mask_id is None
    if added_mask:
        mask_id, model = _add_mask_token(tokenizer, model)
    objective = ObjectiveConfig(mask_token_id=mask_id, **(nld_objective(hf) if nld else {}))
    objective.block_size = block_size or objective.block_size
    precision = PrecisionConfig(dtype=Dtype.bf16 if source.dtypes() == {"BF16"} else Dtype.fp32)
    stored = torch.bfloat16 if precision.dtype is Dtype.bf16 else torch.float32
    checkpoint = TrainConfig(model=model, objective=objective, precision=precision)
    # The trainer's rules for these shapes, in the layout the runs that load it will use.
    validate(
        dataclasses.replace(checkpoint, parallel=ParallelConfig(tensor=tp, pipeline=pp)),
        environment=Environment(),
    )
    config_yaml = to_yaml(checkpoint)

    from train.distributed import single_process

    tmp = _atomic_folder(out, overwrite)
    try:
        tokenizer.save_pretrained(str(tmp / "tokenizer.staged"))
        with single_process():
            sharded = _meta_sharded_state(model, precision.dtype)
            mean_embedding = None
            for entry in keymap.entries(model, layout, tied_head=tied):
                tensor = source.convert(entry, model, stored)
                if added_mask and entry.rule.kind == "vocab":
                    mean_embedding = tensor[:source_vocab].mean(dim=0)
                if added_mask and entry.rule.kind in ("vocab", "head"):
                    tensor[mask_id] = mean_embedding
                _place(sharded, entry, tensor)
            placeholders = [k for k, v in sharded.items() if _is_placeholder(v)]
            if placeholders:
                raise KeyError(f"converted weights do not fit the model: missing {placeholders[:3]}")
            ckpt.save(
                tmp,
                [_ConvertedModel(sharded)],
                None,
                ckpt.TrainState(),
                config_yaml,
                tokenizer=tmp / "tokenizer.staged",
            )
        shutil.rmtree(tmp / "tokenizer.staged")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _meta_sharded_state(model: ModelConfig, dtype: Dtype) -> dict:
    """The sharded state dict (TP = PP = 1) of the model on the meta device: every key, shape, layer
    offset, factory and extra-state object megatron.core writes, and no weights."""
    built = build_model(_local(model), ParallelConfig(), PrecisionConfig(dtype=dtype), meta=True)
    return built.sharded_state_dict()


def _is_placeholder(item) -> bool:
    return isinstance(item, ShardedTensor | ShardedTensorFactory) and item.data.is_meta


def _place(sharded: dict, entry: keymap.Entry, tensor: torch.Tensor) -> None:
    """Put the converted ``tensor`` where the meta model's ``entry.megatron`` placeholder is."""
    placeholder = sharded.get(entry.megatron)
    if not _is_placeholder(placeholder):
        raise KeyError(f"converted weights do not fit the model: unexpected {entry.megatron!r}")
    if tensor.shape != placeholder.data.shape:
        raise ValueError(
            f"{', '.join(entry.hf)} give {entry.megatron} the shape {tuple(tensor.shape)}; the model of "
            f"config.json has {tuple(placeholder.data.shape)}"
        )
    if isinstance(placeholder, ShardedTensorFactory):
        # A factory (SwiGLU's [gate; up]) saves views of its tensor, and megatron's writer copies every
        # view it is given, all before it writes: build the pieces now, each in its own storage, so
        # that the checkpoint writer holds one copy of the weights.
        built = dataclasses.replace(placeholder, data=tensor).build()
        sharded[entry.megatron] = dict_list_map_outplace(
            lambda piece: dataclasses.replace(piece, data=piece.data.clone()), built
        )
    else:
        # The meta model keeps its norms in fp32 (the trainer's Float16Module casts them); the
        # checkpoint stores every tensor in the one dtype, as the trainer's checkpoints do.
        sharded[entry.megatron] = dataclasses.replace(placeholder, data=tensor, dtype=tensor.dtype)


class _ConvertedModel:
    """What ``checkpoint.save`` asks of a model, its sharded state dict, here holding converted weights."""

    def __init__(self, sharded: dict):
        self._sharded = sharded

    def sharded_state_dict(self) -> dict:
        return self._sharded


def _add_mask_token(tokenizer, model: ModelConfig) -> tuple[int, ModelConfig]:
    """Give ``tokenizer`` a ``<|mask|>`` token; returns its id and ``model`` with room for it (a source
    whose embedding has unused rows past the tokenizer keeps them)."""
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    mask_id = tokenizer.mask_token_id
    return mask_id, dataclasses.replace(model, vocab_size=max(model.vocab_size, mask_id + 1))
