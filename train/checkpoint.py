"""Checkpoints: megatron.core dist_checkpointing (torch_dist); a crash never loses the last good one.

Layout under the checkpoint folder::

    iter_0000200/      model + optimizer shards, common state, tandem.json manifest, config.yaml
    iter_0000400/
    latest             "iter_0000400", replaced atomically after the folder is complete
    tokenizer/         a copy of the run's tokenizer, so the folder alone can be exported

A checkpoint is written to ``iter_N.tmp`` and renamed when every rank has finished and the manifest
(files and sizes) is in place; ``latest`` is replaced after that. Loading tries ``latest``, then older
folders, skipping (with a warning) any whose manifest is missing or whose files are truncated or
unreadable. Sharded tensors reshard on load, so a checkpoint saved at one TP/PP layout loads at
another; per-rank RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from train.distributed import collective_device

log = logging.getLogger("tandem.checkpoint")


def _not_async_notice(record: logging.LogRecord) -> bool:
    return "async save is deprecated" not in record.getMessage()


# megatron.core 0.19 runs its synchronous save through the deprecated async path and says so; Tandem saves
# synchronously, so that notice is noise.
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_not_async_notice)

MANIFEST = "tandem.json"
LATEST = "latest"
TOKENIZER = "tokenizer"


@dataclass
class TrainState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed (the data position)
    layout: tuple[int, int, int] = (1, 1, 1)  # (tp, pp, dp) of the run that saved it


def _folder(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_object() -> ShardedObject:
    tp, pp, dp = _layout()
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _model_sharded(models: list) -> dict:
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def _manifest(folder: Path, state: TrainState) -> dict:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {"state": asdict(state), "files": files}


def _in_process_results_queue() -> None:
    # megatron.core's torch_dist writer collects its results through a queue it creates lazily from a
    # *spawn* multiprocessing Manager: a second Python that re-imports __main__ (8 s on 2 cores, and a
    # crash when __main__ is stdin or a notebook). Tandem saves synchronously, so the results are
    # produced and consumed in this process and a plain queue serves.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save(
    root: Path,
    models: list,
    optimizer,
    state: TrainState,
    config_yaml: str,
    keep: int = 0,
    tokenizer: Path | None = None,
) -> Path:
    """Save ``models`` (megatron chunks), ``optimizer`` (None: weights only, e.g. an imported model) and
    ``state`` under ``root``; collective. ``tokenizer`` is copied once to ``root/tokenizer``, so that a
    checkpoint folder is all an export needs."""
    _in_process_results_queue()
    rank0 = dist.get_rank() == 0
    final, tmp = _folder(root, state.step), _folder(root, state.step).with_suffix(".tmp")
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None and not (root / TOKENIZER).is_dir():
            staged = root / (TOKENIZER + ".tmp")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(tokenizer, staged)
            os.replace(staged, root / TOKENIZER)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state.layout = _layout()
    model_sd = _model_sharded(models)
    sharded = dict(model_sd)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd)
    sharded["rng_state"] = _rng_object()
    sharded["train_state"] = asdict(state)
    dist_checkpointing.save(sharded, str(tmp))
    dist.barrier()
    if rank0:
        (tmp / "config.yaml").write_text(config_yaml)
        _atomic_write(tmp / MANIFEST, json.dumps(_manifest(tmp, state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(folder: Path) -> str | None:
    """None when ``folder`` looks complete, else why not (cheap: manifest and file sizes)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated or changed)"
    return None


def candidates(root: Path) -> list[Path]:
    """Finished checkpoint folders, best first: the one ``latest`` names, then newest to oldest."""
    if not root.is_dir():
        return []
    folders = sorted(
        (p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True
    )
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in folders:
            folders.remove(named)
            folders.insert(0, named)
    return folders


def _broadcast_path(path: Path | None) -> Path | None:
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] is not None else None


def _all_ok(ok: bool) -> bool:
    """True when every rank says ``ok``; collective (its flag lives where the group's backend needs it)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flag)
    return flag.item() == 0


def load(
    root: Path, models: list, optimizer, weights_only: bool = False, only: Path | None = None
) -> tuple[TrainState, Path] | None:
    """Load the newest good checkpoint under ``root`` (or just the folder ``only``) into ``models``
    (and ``optimizer``); collective.

    Returns (state, folder), or None when no usable checkpoint is there. ``weights_only`` loads the
    model alone (fine-tuning from another run or an imported model) and returns a fresh state."""
    tried: list[str] = []
    remaining = ([only] if only is not None else candidates(root)) if dist.get_rank() == 0 else []
    while True:
        folder = None
        if dist.get_rank() == 0:
            while remaining and folder is None:
                candidate = remaining.pop(0)
                problem = verify(candidate)
                if problem:
                    log.warning("skipping checkpoint %s: %s", candidate, problem)
                    tried.append(problem)
                else:
                    folder = candidate
        folder = _broadcast_path(folder)
        if folder is None:
            if tried and dist.get_rank() == 0:
                log.warning("no usable checkpoint in %s; starting fresh", root)
            return None
        try:
            state = _load_folder(folder, models, optimizer, weights_only)
            ok = True
        except Exception as err:  # a corrupt shard surfaces as any of several exception types
            log.warning(
                "checkpoint %s could not be loaded (%s: %s); trying an older one",
                folder,
                type(err).__name__,
                err,
            )
            ok, state = False, None
        if _all_ok(ok):
            if tried and dist.get_rank() == 0:
                log.warning("resumed from %s, an older checkpoint, because newer ones were unusable", folder)
            return state, folder


@contextlib.contextmanager
def _quiet_torch_dist_load():
    with warnings.catch_warnings():
        # megatron.core 0.19 reads the common state with torch's single-process loader, which warns twice.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="The argument order of load has been changed")
        # torch's own deprecations of the calls megatron.core's torch_dist strategy still makes.
        warnings.filterwarnings("ignore", category=FutureWarning, message="`load_state_dict` is deprecated")
        warnings.filterwarnings("ignore", category=FutureWarning, message="Please use DTensor instead")
        yield


def _load_folder(folder: Path, models: list, optimizer, weights_only: bool) -> TrainState:
    with _quiet_torch_dist_load():
        common = dist_checkpointing.load_common_state_dict(str(folder))
    saved = TrainState(**{**common["train_state"], "layout": tuple(common["train_state"]["layout"])})
    model_sd = _model_sharded(models)
    request = dict(model_sd)
    if not weights_only:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
        if saved.layout == _layout():
            request["rng_state"] = _rng_object()
    with _quiet_torch_dist_load():
        loaded = dist_checkpointing.load(request, str(folder))
    if len(models) == 1:
        models[0].load_state_dict(loaded["model"])
    else:
        for i, model in enumerate(models):
            model.load_state_dict(loaded[f"model{i}"])
    if weights_only:
        return TrainState()
    optimizer.load_state_dict(loaded["optimizer"])
    rng = loaded.get("rng_state")
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return saved
