"""Checkpoints to and from Hugging Face folders in the Nemotron-Labs-Diffusion (NLD) format.

``export_checkpoint``: a Tandem dist checkpoint saved at any TP/PP -> ``config.json`` (architecture
``NemotronLabsDiffusionModel``), safetensors with NLD weight names, the tokenizer, and Tandem's remote
code (``model/hf/*`` plus the mask and RoPE modules it trains with, copied byte for byte).
``import_hf``: an NLD folder or a Llama / Mistral / Ministral-3 / Qwen3 causal LM -> a Tandem
checkpoint (weights only) that the trainer starts from with ``checkpoint.load=... checkpoint.finetune=true``.
Both write to a temporary folder and rename it when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kernels.masks import CleanAttention
from model import keymap
from model.config import ConfigError, Dtype, ModelConfig, ParallelConfig, PrecisionConfig, TransformerImpl
from model.hf_config import MODEL_TYPE, model_from_hf, nld_config
from model.megatron import build_model
from train import checkpoint as ckpt
from train.config import ObjectiveConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
# Export file name -> source in this repository.
REMOTE_CODE = {
    "configuration_nemotron_labs_diffusion.py": REPO / "model/hf/configuration_nemotron_labs_diffusion.py",
    "modeling_nemotron_labs_diffusion.py": REPO / "model/hf/modeling_nemotron_labs_diffusion.py",
    "tandem_decoding.py": REPO / "model/hf/tandem_decoding.py",
    "tandem_masks.py": REPO / "kernels/masks.py",
    "tandem_rope.py": REPO / "model/rope.py",
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_SIZE = "5GB"


@dataclass
class CheckpointInfo:
    folder: Path  # the iter_* folder
    model: ModelConfig
    objective: ObjectiveConfig
    precision: PrecisionConfig
    tokenizer: Path


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """The newest good checkpoint under ``path``: a run folder, its checkpoints/, or an iter_* folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / ckpt.MANIFEST).is_file():
        folders = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        folders = ckpt.candidates(root)
    for folder in folders:
        if ckpt.verify(folder) is None:
            return _read_info(folder)
    raise FileNotFoundError(
        f"no complete Tandem checkpoint under {path} (looked for iter_*/ folders with {ckpt.MANIFEST}); "
        "give a run folder, its checkpoints/ folder or one iter_* folder"
    )


def _read_info(folder: Path) -> CheckpointInfo:
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(folder / "config.yaml"))
    model = OmegaConf.to_object(saved.model)
    objective = OmegaConf.to_object(saved.objective)
    precision = OmegaConf.to_object(saved.precision)
    tokenizer = folder.parent / ckpt.TOKENIZER
    if not tokenizer.is_dir():
        raise FileNotFoundError(
            f"{tokenizer} is missing: the checkpoint root keeps a copy of the run's tokenizer; copy the "
            "tokenizer folder the run trained with there"
        )
    return CheckpointInfo(folder, model, objective, precision, tokenizer)


def load_megatron_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Whole (TP = PP = 1) local-spec weights of a checkpoint saved at any layout."""
    from train.distributed import single_process

    model_cfg = _local(info.model)
    with single_process():
        model = build_model(model_cfg, ParallelConfig(), PrecisionConfig())
        loaded = ckpt.load(info.folder.parent, [model], None, weights_only=True, only=info.folder)
        if loaded is None:
            raise RuntimeError(f"could not load {info.folder}")
        return {k: v.detach().cpu() for k, v in keymap.to_local_names(model.state_dict()).items()}


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


def save_safetensors(state: dict[str, torch.Tensor], folder: Path) -> None:
    """``model.safetensors`` or shards of at most SHARD_SIZE with ``model.safetensors.index.json``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file(
            {n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"}
        )
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} has no model.safetensors (or index); only safetensors weights are read"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the NLD-format Hugging Face folder of a Tandem checkpoint; returns ``out``."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer_info

    info = find_checkpoint(checkpoint)
    out = Path(out)
    dtype = dtype or ("bfloat16" if info.precision.dtype is Dtype.bf16 else "float32")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(TORCH_DTYPES)}")
    tokenizer_info = load_tokenizer_info(info.tokenizer)
    mask_id = (
        info.objective.mask_token_id if info.objective.mask_token_id is not None else tokenizer_info.mask_id
    )
    state = keymap.to_hf(load_megatron_state(info), info.model, keymap.LAYOUTS[MODEL_TYPE])
    state = {k: v.to(TORCH_DTYPES[dtype]) for k, v in state.items()}
    tokenizer = AutoTokenizer.from_pretrained(str(info.tokenizer))
    config = nld_config(
        info.model,
        mask_token_id=mask_id,
        block_size=info.objective.block_size,
        clean_attention=info.objective.clean_attention.value,
        dlm_loss_weight=info.objective.diffusion_weight,
        ar_loss_weight=info.objective.ar_weight,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    tmp = _atomic_folder(out, overwrite)
    try:
        save_safetensors(state, tmp)
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
    so the folder serves any layout."""
    from transformers import AutoTokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: give a Hugging Face model folder")
    hf = json.loads(config_file.read_text())
    model = model_from_hf(hf, name=hf_dir.name)
    nld = hf.get("model_type") == MODEL_TYPE
    layout = keymap.LAYOUTS[MODEL_TYPE if nld else "llama"]
    source = load_safetensors(hf_dir)
    source_dtype = next(iter(source.values())).dtype
    tied = bool(hf.get("tie_word_embeddings", False)) and layout.head not in source
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    mask_id = hf.get("mask_token_id") if nld else mask_token_id
    if mask_id is None and tokenizer.mask_token_id is not None:
        mask_id = tokenizer.mask_token_id
    state = keymap.from_hf(source, model, layout, tied_head=tied)
    if mask_id is None:
        mask_id, model, state = _add_mask_token(tokenizer, model, state)
    if not 0 <= mask_id < model.vocab_size:
        raise ValueError(f"mask token id {mask_id} is outside the vocabulary of {model.vocab_size}")
    objective = ObjectiveConfig(mask_token_id=mask_id, block_size=block_size or hf.get("block_size", 32))
    if nld:
        objective.clean_attention = CleanAttention(hf.get("clean_attention", "causal"))
        objective.ar_weight = hf.get("ar_loss_weight", 1.0)
        objective.diffusion_weight = hf.get("dlm_loss_weight") or 0.3
    _check_layout(model, tp, pp)
    precision = PrecisionConfig(dtype=Dtype.bf16 if source_dtype == torch.bfloat16 else Dtype.fp32)
    train_cfg = OmegaConf.structured(TrainConfig)
    train_cfg.model, train_cfg.objective, train_cfg.precision = model, objective, precision
    config_yaml = OmegaConf.to_yaml(train_cfg)

    from train.distributed import single_process

    tmp = _atomic_folder(out, overwrite)
    try:
        tokenizer.save_pretrained(str(tmp / "tokenizer.staged"))
        with single_process():
            megatron = build_model(_local(model), ParallelConfig(), PrecisionConfig())
            missing, unexpected = megatron.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise KeyError(
                    f"converted weights do not fit the model: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
            ckpt.save(
                tmp, [megatron], None, ckpt.TrainState(), config_yaml, tokenizer=tmp / "tokenizer.staged"
            )
        shutil.rmtree(tmp / "tokenizer.staged")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    for name in ("num_attention_heads", "query_groups", "ffn_hidden_size", "padded_vocab_size"):
        if getattr(model, name) % tp:
            raise ConfigError(f"--tp {tp} does not divide {name}={getattr(model, name)} of this model")
    if model.num_layers % pp:
        raise ConfigError(f"--pp {pp} does not divide the {model.num_layers} layers of this model")


def _add_mask_token(tokenizer, model: ModelConfig, state: dict[str, torch.Tensor]):
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    mask_id = tokenizer.mask_token_id
    grown = dataclasses.replace(model, vocab_size=mask_id + 1)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        weight = state[name]
        rows = torch.zeros(grown.padded_vocab_size, weight.shape[1], dtype=weight.dtype)
        rows[: model.vocab_size] = weight[: model.vocab_size]
        rows[mask_id] = state["embedding.word_embeddings.weight"][: model.vocab_size].mean(dim=0)
        state[name] = rows
    return mask_id, grown, state
