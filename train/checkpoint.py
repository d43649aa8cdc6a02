"""Checkpoints: megatron.core dist_checkpointing (torch_dist); a crash never loses the last good one.

Layout under the checkpoint folder::

    iter_0000200/      model + optimizer shards, common state, config.yaml, tandem.json manifest
    iter_0000400/
    latest             "iter_0000400", replaced atomically after the folder is complete
    tokenizer/         a copy of the run's tokenizer, so the folder alone can be exported
    unreadable/        damaged checkpoints a run was told to pass over (Tandem never deletes them)

A checkpoint is written to ``iter_N.tmp``; when every rank has finished, the ranks hash its files
between them and rank 0 writes the manifest (every file with its size and sha256), renames the folder
to ``iter_N``, replaces ``latest`` and prunes. A crash at any point leaves the older checkpoints as they
were, and a half-written folder is never taken for a checkpoint.

Loading takes the newest checkpoint by step (``latest`` names it unless a crash came between the
rename and ``latest``); the folder to be loaded is verified in full (sizes and checksums, files read
once, in parallel over the ranks) before anything is read into the model. What happens when it is
damaged is the run's ``checkpoint.on_unreadable``: ``error`` (stop, listing every checkpoint and why it
failed), ``previous`` (the newest good one) or ``fresh`` (that, else step 0). A
checkpoint of another configuration (shapes, objective, tokenizer) is a ``CheckpointMismatch``, never
"damaged". Sharded tensors reshard on load, so a checkpoint saved at one TP/PP layout loads at
another; per-rank RNG states are restored only when the layout is unchanged.

The folder's ``.metadata`` and ``common.pt`` are pickles (torch.distributed.checkpoint's format):
load checkpoints you or your runs wrote. The checksums detect damage, not tampering.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from data.metadata import write_atomic
from model.config import ModelConfig
from train.config import OnUnreadable
from train.distributed import collective_device, from_rank0
from train.objectives import ObjectiveKind

log = logging.getLogger("tandem.checkpoint")


def _not_async_notice(record: logging.LogRecord) -> bool:
    return "async save is deprecated" not in record.getMessage()


# megatron.core 0.19 runs its synchronous save through the deprecated async path and says so; Tandem saves
# synchronously, so that notice is noise.
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_not_async_notice)

MANIFEST = "tandem.json"
MANIFEST_FORMAT = 2  # 1: sizes only; 2: sizes and sha256 per file, the tokenizer's fingerprint
LATEST = "latest"
TOKENIZER = "tokenizer"
UNREADABLE = "unreadable"
LOCK = "tandem.lock"
_NAME = re.compile(r"iter_(\d+)")
# What a failed save or load raises: torch.distributed.checkpoint's CheckpointException (every rank's
# error) derives from BaseException, not Exception.
FAILURES = (Exception, CheckpointException)


class CheckpointError(Exception):
    """A checkpoint that cannot serve as asked; the message says which, why, and what to do."""


class CheckpointUnreadable(CheckpointError):
    """Checkpoints are there but damaged (truncated, garbage, missing files)."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint of another configuration or code than this run's."""


class CheckpointSaveError(CheckpointError):
    """A save failed (e.g. disk full); the checkpoints saved before it are untouched."""


class RunLocked(CheckpointError):
    """Another live trainer holds the run folder."""


@dataclass
class TrainState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed (the data position)
    layout: tuple[int, int, int] = (1, 1, 1)  # (tp, pp, dp) of the run that saved it


class Loaded(NamedTuple):
    state: TrainState
    folder: Path


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run that resumes from it."""

    model: ModelConfig
    objective: ObjectiveKind
    tokenizer_fingerprint: str | None = None


# ModelConfig attributes that fix the saved tensors' shapes, with the config key a message names.
SHAPE_FIELDS = {
    "num_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "ffn_hidden_size": "model.ffn_hidden_size",
    "num_attention_heads": "model.num_attention_heads",
    "query_groups": "model.num_query_groups",
    "head_dim": "model.kv_channels",
    "vocab_size": "model.vocab_size",
    "padded_vocab_size": "the padded vocabulary (model.make_vocab_size_divisible_by)",
    "qk_layernorm": "model.qk_layernorm",
}


def _folder(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name (``iter_0000200`` -> 200), None for any other name."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


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


def _in_process_results_queue() -> None:
    # megatron.core's torch_dist writer collects its results through a queue it creates lazily from a
    # *spawn* multiprocessing Manager: a second Python that re-imports __main__ (8 s on 2 cores, and a
    # crash when __main__ is stdin or a notebook). Tandem saves synchronously, so the results are
    # produced and consumed in this process and a plain queue serves.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


# ---- collectives (every rank calls them in the same order) ---------------------------------------


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def _all_ok(ok: bool) -> bool:
    """True when every rank says ``ok``; collective (its flag lives where the group's backend needs it)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flag)
    return flag.item() == 0


def _one_line(err: BaseException) -> str:
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]  # the first rank's own error, not every traceback
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:600]}" if text else type(err).__name__


# ---- checksums -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_share(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of this rank's share of ``names`` (every world_size-th), gathered onto every rank: the
    hashing of a large checkpoint is spread over the ranks (about 1 GB/s per rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for name in names[rank::world]:
        try:
            mine[name] = _sha256(folder / name)
        except OSError as err:
            mine[name] = f"unreadable ({_one_line(err)})"
    merged: dict[str, str] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def _read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, why it is missing or unreadable)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None, f"no {MANIFEST} (the save did not finish)"
    try:
        data = json.loads(manifest.read_bytes().decode())
        files = data["files"]
        if not isinstance(files, dict) or not isinstance(data.get("state"), dict):
            raise ValueError("'files' and 'state' must be objects")
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        return None, f"{MANIFEST} is unreadable ({_one_line(err)})"
    return data, None


def _expected(entry) -> tuple[int, str | None]:
    """(size, sha256 or None) of a manifest file entry (format 1 held the size alone)."""
    if isinstance(entry, dict):
        return int(entry["bytes"]), entry.get("sha256")
    return int(entry), None


def _size_problem(folder: Path, files: dict) -> str | None:
    for name, entry in files.items():
        path = folder / name
        try:
            size, _ = _expected(entry)
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST} is unreadable (bad entry for {name})"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated or changed)"
    return None


def _hash_problem(files: dict, hashes: dict[str, str]) -> str | None:
    for name, got in sorted(hashes.items()):
        _, want = _expected(files[name])
        if got != want:
            detail = got if got.startswith("unreadable") else "its content changed since it was saved"
            return f"{name} does not match its sha256 in {MANIFEST} ({detail})"
    return None


def verify(folder: Path, checksums: bool = False) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why not. Cheap by default (manifest and file
    sizes); ``checksums`` also hashes every file (in this process: for tools without a process group)."""
    data, problem = _read_manifest(folder)
    if problem:
        return problem
    problem = _size_problem(folder, data["files"])
    if problem or not checksums:
        return problem
    hashed = {n: _sha256(folder / n) for n, e in data["files"].items() if _expected(e)[1] is not None}
    return _hash_problem(data["files"], hashed)


def _verify_collectively(folder: Path) -> str | None:
    """``verify(folder, checksums=True)`` with the hashing spread over the ranks; collective."""

    def manifest_files():
        data, problem = _read_manifest(folder)
        problem = problem or _size_problem(folder, data["files"])
        return problem, None if problem else data["files"]

    problem, files = from_rank0(manifest_files)
    if problem:
        return problem
    names = sorted(n for n, e in files.items() if _expected(e)[1] is not None)
    return _hash_problem(files, _hash_share(folder, names))


def manifest_of(folder: Path) -> dict:
    """The manifest of a complete checkpoint folder (``CheckpointUnreadable`` when there is none)."""
    data, problem = _read_manifest(folder)
    if problem:
        raise CheckpointUnreadable(f"{folder}: {problem}")
    return data


# ---- the folder: which checkpoints are there -------------------------------------------------------


def _checkpoint_folders(root: Path) -> list[Path]:
    """Every ``iter_N`` folder under ``root``, oldest to newest by step."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def read_latest(root: Path) -> tuple[str | None, str | None]:
    """(the checkpoint name ``latest`` holds, None) or (None, why it cannot be used); (None, None) when
    there is no ``latest``."""
    path = root / LATEST
    if not path.is_file():
        return None, None
    try:
        text = path.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path} is not a checkpoint name ({_one_line(err)})"
    if not text:
        return None, f"{path} is empty"
    if not _NAME.fullmatch(text):
        return None, f"{path} holds {text[:40]!r}, not a checkpoint name like iter_0000200"
    return text, None


def candidates(root: Path) -> list[Path]:
    """Finished-looking checkpoint folders (manifest or not), newest step first."""
    return list(reversed(_checkpoint_folders(root)))


def has_checkpoints(root: Path) -> bool:
    """Whether ``root`` holds any checkpoint folder or a ``latest`` (damaged or not)."""
    return bool(_checkpoint_folders(root)) or (root / LATEST).exists()


@dataclass
class _Entry:
    name: str
    path: Path | None  # None: named by ``latest`` but missing
    problem: str | None = None  # known before reading any file (missing folder)


def _inventory(root: Path) -> list[_Entry]:
    """The checkpoints under ``root`` newest first, the one ``latest`` names included even when its
    folder is missing (a newest checkpoint that is gone is a damaged checkpoint, not none)."""
    entries = [_Entry(p.name, p) for p in candidates(root)]
    named, problem = read_latest(root)
    if problem:
        log.warning("%s; using the checkpoint folders themselves", problem)
    elif named is not None and not (root / named).is_dir():
        newest = step_of(entries[0].path) if entries else -1
        if int(_NAME.fullmatch(named).group(1)) > newest:
            entries.insert(0, _Entry(named, None, f"{root / LATEST} names it but the folder is missing"))
        else:
            log.warning("%s names %s, which is missing; using the checkpoint folders", root / LATEST, named)
    elif named is not None and entries and entries[0].name != named:
        log.warning(
            "%s is newer than %s (%s): its save finished but the run stopped before updating %s",
            entries[0].name,
            LATEST,
            named,
            LATEST,
        )
    return entries


# ---- save ------------------------------------------------------------------------------------------


def _agree(error: BaseException | None, what: str, final: Path, tmp: Path) -> None:
    """Raise ``CheckpointSaveError`` on every rank when ``what`` failed on any; collective. The
    unfinished folder is removed (a full disk gets its space back); nothing else is touched."""
    problems = [(r, p) for r, p in enumerate(_gather(None if error is None else _one_line(error))) if p]
    if not problems:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    named, _ = read_latest(final.parent)
    if final.is_dir() and verify(final) is None:
        outcome = f"{final.name} itself is complete (only {LATEST} was not updated) and is resumed from"
    else:
        kept = f"the checkpoint {named} and older ones are" if named else "earlier checkpoints are"
        outcome = f"{kept} untouched and the unfinished {tmp.name} was removed"
    raise CheckpointSaveError(
        f"saving checkpoint {final.name} failed while {what} (rank {problems[0][0]}: {problems[0][1]}); "
        f"{outcome}; free space (or fix the error) and start the run again to resume"
    ) from error


def save(
    root: Path,
    models: list,
    optimizer,
    state: TrainState,
    config_yaml: str,
    keep: int = 0,
    tokenizer: Path | None = None,
    *,
    tokenizer_fingerprint: str | None = None,
    prune: bool = True,
) -> Path:
    """Save ``models`` (megatron chunks), ``optimizer`` (None: weights only, e.g. an imported model) and
    ``state`` under ``root``; collective. ``tokenizer`` is copied once to ``root/tokenizer``, so that a
    checkpoint folder is all an export needs. ``keep`` > 0 keeps that many checkpoints (``prune=False``:
    none is deleted). Raises ``CheckpointSaveError`` on every rank when any rank's part failed."""
    _in_process_results_queue()
    rank0 = dist.get_rank() == 0
    final, tmp = _folder(root, state.step), _folder(root, state.step).with_suffix(".tmp")
    error = None
    if rank0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tokenizer is not None and not (root / TOKENIZER).is_dir():
                staged = root / (TOKENIZER + ".tmp")
                shutil.rmtree(staged, ignore_errors=True)
                shutil.copytree(tokenizer, staged)
                os.replace(staged, root / TOKENIZER)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except Exception as err:  # any failure here must reach _agree, or the other ranks wait
            error = err
    _agree(error, "preparing its folder", final, tmp)
    state.layout = _layout()
    model_sd = _model_sharded(models)
    sharded = dict(model_sd)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd)
    sharded["rng_state"] = _rng_object()
    sharded["train_state"] = asdict(state)
    try:
        dist_checkpointing.save(sharded, str(tmp))
    except FAILURES as err:  # a writer's OSError (disk full) arrives wrapped in a CheckpointException
        error = err
    _agree(error, "writing the shards", final, tmp)
    names = None
    if rank0:
        try:
            (tmp / "config.yaml").write_text(config_yaml)
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        except Exception as err:  # any failure here must reach _agree, or the other ranks wait
            error = err
    _agree(error, "writing config.yaml", final, tmp)
    hashes = _hash_share(tmp, _broadcast(names))
    if rank0:
        try:
            unreadable = [f"{n}: {h}" for n, h in hashes.items() if h.startswith("unreadable")]
            if unreadable:
                raise OSError(f"cannot read back {unreadable[0]}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "state": asdict(state),
                "tokenizer_fingerprint": tokenizer_fingerprint,
                "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": hashes[n]} for n in names},
            }
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            _replace_folder(tmp, final)
            write_atomic(root / LATEST, final.name)
        except Exception as err:  # any failure here must reach _agree, or the other ranks wait
            error = err
    _agree(error, "writing its manifest and publishing it", final, tmp)
    if rank0 and prune:
        try:
            _prune(root, keep, final)
        except Exception as err:  # the new checkpoint is complete: a failed clean-up only warns
            log.warning("pruning old checkpoints under %s failed: %s", root, _one_line(err))
    dist.barrier()
    return final


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a folder already there (a step saved again) goes only afterwards."""
    if final.exists():
        old = final.with_name(final.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        _delete(old)
    else:
        os.replace(tmp, final)


def _delete(path: Path) -> None:
    """Remove a folder so that a crash midway never leaves a half-deleted checkpoint that looks whole."""
    doomed = path if path.name.endswith(".deleting") else path.with_name(path.name + ".deleting")
    if doomed != path:
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _is_leftover(name: str, written: Path) -> bool:
    """A folder that an interrupted deletion, replacement or save (of another step) left behind."""
    if name.endswith((".deleting", ".replaced")):
        return True
    return name.endswith(".tmp") and name != written.name + ".tmp" and _NAME.fullmatch(name[:-4]) is not None


def _prune(root: Path, keep: int, written: Path) -> None:
    """Delete checkpoints beyond the newest ``keep`` by step (0 keeps all), never the one just written,
    the one ``latest`` names, or any newer than the one just written; and the leftovers of deletions and
    saves that a crash interrupted (this run holds the folder's lock)."""
    for leftover in root.iterdir():
        if leftover.is_dir() and _is_leftover(leftover.name, written):
            _delete(leftover)
    if keep <= 0:
        return
    done = _checkpoint_folders(root)
    named, _ = read_latest(root)
    newest = step_of(written)
    for old in done[:-keep]:
        if old.name in (written.name, named) or step_of(old) >= newest:
            continue
        _delete(old)


# ---- load ------------------------------------------------------------------------------------------


def _saved_config(folder: Path):
    """The TrainConfig a checkpoint's config.yaml describes (its schema-merged OmegaConf tree)."""
    from omegaconf import OmegaConf

    from train.config import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(folder / "config.yaml"))


def saved_model_config(folder: Path) -> ModelConfig:
    """The model config of a checkpoint (``CheckpointUnreadable`` when config.yaml is damaged)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(_saved_config(folder).model)
    except Exception as err:  # OmegaConf and YAML raise many types for a damaged file
        raise CheckpointUnreadable(f"{folder / 'config.yaml'} is unreadable ({_one_line(err)})") from err


def _mismatch(folder: Path, expect: RunIdentity, weights_only: bool) -> tuple[str | None, str | None]:
    """(how the checkpoint's configuration differs from ``expect``, None), or (None, why its config.yaml
    is unreadable)."""
    from omegaconf import OmegaConf

    try:
        saved = _saved_config(folder)
        model = OmegaConf.to_object(saved.model)
        objective = ObjectiveKind(saved.objective.kind)
    except Exception as err:  # a damaged config.yaml: OmegaConf, YAML and ValueError types
        return None, f"config.yaml is unreadable ({_one_line(err)})"
    diffs = [
        f"{key} {getattr(model, field)} (this run: {getattr(expect.model, field)})"
        for field, key in SHAPE_FIELDS.items()
        if getattr(model, field) != getattr(expect.model, field)
    ]
    if not weights_only:
        if objective is not expect.objective:
            diffs.append(f"objective.kind {objective.value} (this run: {expect.objective.value})")
        data, _ = _read_manifest(folder)
        saved_fingerprint = (data or {}).get("tokenizer_fingerprint")
        if (
            saved_fingerprint
            and expect.tokenizer_fingerprint
            and saved_fingerprint != expect.tokenizer_fingerprint
        ):
            diffs.append("the tokenizer (data.tokenizer is not the one it was trained with)")
    if not diffs:
        return None, None
    hint = (
        "checkpoint.finetune loads weights of the same shapes only"
        if weights_only
        else f"to start a new run from its weights use checkpoint.load={folder} checkpoint.finetune=true "
        "(same shapes), or give this run its own run_dir"
    )
    return f"{folder} was saved with {'; '.join(diffs)}; {hint}", None


def _listing(tried: list[tuple[str, str]], rest: list[_Entry]) -> str:
    lines = [f"  {name}: {why}" for name, why in tried]
    for entry in rest:
        problem = entry.problem or verify(entry.path)
        lines.append(f"  {entry.name}: {problem or 'complete by its sizes (not tried)'}")
    return "\n".join(lines)


def load(
    root: Path,
    models: list,
    optimizer,
    weights_only: bool = False,
    only: Path | None = None,
    *,
    on_unreadable: OnUnreadable = OnUnreadable.error,
    expect: RunIdentity | None = None,
    move_damaged: bool = False,
) -> Loaded | None:
    """Load the newest checkpoint under ``root`` (or just the folder ``only``) into ``models`` (and
    ``optimizer``); collective. ``weights_only`` loads the model alone (fine-tuning from another run
    or an imported model) and returns a fresh state.

    The folder is verified in full first. A damaged newest checkpoint is handled as ``on_unreadable``
    says: ``error`` raises ``CheckpointUnreadable`` listing every checkpoint and why; ``previous`` loads
    the newest good one; ``fresh`` does too, and returns None (step 0) when none is loadable.
    ``expect`` (the run's shapes, objective, tokenizer) turns another configuration into a
    ``CheckpointMismatch``. ``move_damaged`` (the run's own folder): checkpoints passed over are moved
    into ``root/unreadable/`` and ``latest`` follows the one loaded, so that the next start sees a
    consistent folder. Returns (state, folder), or None when there is no checkpoint (or, with
    ``fresh``, none loadable)."""
    entries = from_rank0(lambda: [_Entry(only.name, only)] if only is not None else _inventory(root))
    tried: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        problem = entry.problem or _verify_collectively(entry.path)
        if problem is None and expect is not None:
            mismatch, problem = from_rank0(lambda e=entry: _mismatch(e.path, expect, weights_only))
            if mismatch:
                raise CheckpointMismatch(mismatch)
        state = None
        if problem is None:
            state, problem = _load_intact(entry.path, models, optimizer, weights_only)
        if problem is None:
            if tried:
                from_rank0(lambda i=index: _passed_over(root, entries[:i], entries[i], tried, move_damaged))
            return Loaded(state, entry.path)
        if dist.get_rank() == 0:
            log.warning("checkpoint %s is unusable: %s", entry.path or root / entry.name, problem)
        tried.append((entry.name, problem))
        if on_unreadable is OnUnreadable.error:
            listing = from_rank0(lambda i=index: _listing(tried, entries[i + 1 :]))
            where = f"checkpoint {only}" if only is not None else f"newest checkpoint under {root}"
            raise CheckpointUnreadable(
                f"the {where} cannot be loaded (checkpoint.on_unreadable=error):\n{listing}\nrepair or "
                "move it, or restart with checkpoint.on_unreadable=previous (the newest good one) or "
                "checkpoint.on_unreadable=fresh (that, else step 0); damaged checkpoints are then moved "
                "to unreadable/, never deleted"
            )
    if not entries:
        return None
    if on_unreadable is OnUnreadable.fresh and only is None:
        from_rank0(lambda: _start_over(root, entries, tried, move_damaged))
        return None
    raise CheckpointUnreadable(
        f"no checkpoint under {root} can be loaded:\n{_listing(tried, [])}\nrepair one, or restart with "
        "checkpoint.on_unreadable=fresh to start at step 0 (they are then moved to unreadable/, not deleted)"
    )


def _load_intact(
    folder: Path, models: list, optimizer, weights_only: bool
) -> tuple[TrainState | None, str | None]:
    """(state, None) once ``folder`` (verified) is loaded, or (None, why) for a format-1 folder whose
    damage its sizes could not show; ``CheckpointMismatch`` when checksummed files do not load."""
    legacy = from_rank0(lambda: _legacy(folder))
    try:
        state, failure = _load_folder(folder, models, optimizer, weights_only), None
    except FAILURES as err:
        state, failure = None, _one_line(err)
    failures = [f for f in _gather(failure) if f]
    if not failures:
        return state, None
    if legacy:
        return None, f"could not be loaded ({failures[0]})"
    raise CheckpointMismatch(
        f"{folder} is intact (its files match their checksums) but does not load into this run: "
        f"{failures[0]}; a checkpoint of another model or code version? Start a new run from its weights "
        f"with checkpoint.load={folder} checkpoint.finetune=true"
    )


def _passed_over(root: Path, damaged: list[_Entry], loaded: _Entry, tried, move_damaged: bool) -> None:
    log.warning("resumed from %s, an older checkpoint; passed over:\n%s", loaded.path, _listing(tried, []))
    if move_damaged:
        _move_aside(root, [e for e in damaged if e.path is not None])
        write_atomic(root / LATEST, loaded.name)


def _start_over(root: Path, entries: list[_Entry], tried, move_damaged: bool) -> None:
    log.warning(
        "no checkpoint under %s is loadable; starting at step 0 (checkpoint.on_unreadable=fresh):\n%s",
        root,
        _listing(tried, []),
    )
    if move_damaged:
        _move_aside(root, [e for e in entries if e.path is not None], latest_too=True)


def _legacy(folder: Path) -> bool:
    """True for a manifest without checksums (format 1): a load error there may be damage."""
    data, _ = _read_manifest(folder)
    return not data or any(_expected(e)[1] is None for e in data["files"].values())


def _move_aside(root: Path, entries: list[_Entry], latest_too: bool = False) -> None:
    aside = root / UNREADABLE
    aside.mkdir(exist_ok=True)
    moved = [e.path for e in entries]
    if latest_too and (root / LATEST).exists():
        moved.append(root / LATEST)
    for path in moved:
        target, n = aside / path.name, 1
        while target.exists():
            target, n = aside / f"{path.name}.{n}", n + 1
        os.replace(path, target)
        log.warning("moved %s to %s (kept, never deleted)", path, target)


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


# ---- one trainer per folder ------------------------------------------------------------------------


class RunLock:
    """A lock file (``tandem.lock``: host, pid, start time) that keeps a second trainer out of a run
    folder. Its owner refreshes it every ``HEARTBEAT_S``; a lock is taken over when its owner is dead: at
    once on the owner's host (the pid is gone), from elsewhere ``STALE_AFTER_S`` after the last refresh."""

    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 180.0

    def __init__(self, folders: list[Path]):
        self.paths = [folder / LOCK for folder in folders]
        self._owned: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        if os.environ.get("SLURM_JOB_ID"):
            self.info["slurm_job"] = os.environ["SLURM_JOB_ID"]

    def acquire(self) -> None:
        """Take every lock or none (``RunLocked`` naming the owner)."""
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="tandem-lock-heartbeat", daemon=True)
        self._thread.start()

    def _take(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, stale = self._judge(path)
                if not stale:
                    raise RunLocked(
                        f"{path.parent} is in use by another trainer: {owner}; stop that run or give this "
                        f"one another run_dir (a dead owner's lock is taken over: at once on its host, "
                        f"{self.STALE_AFTER_S:.0f} s after its last heartbeat elsewhere)"
                    ) from None
                log.warning("taking over %s: %s", path, stale)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path.with_name(f"{path.name}.stale.{os.getpid()}"))
                    os.unlink(path.with_name(f"{path.name}.stale.{os.getpid()}"))
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._owned.append(path)
            return
        raise RunLocked(f"could not take {path}: other trainers keep taking it")

    def _judge(self, path: Path) -> tuple[str, str | None]:
        """(who owns ``path``, why that owner is dead or None while it may be alive)."""
        try:
            age = time.time() - path.stat().st_mtime
            owner = json.loads(path.read_text())
            host, pid = owner["host"], int(owner["pid"])
        except FileNotFoundError:
            return "nobody", "it was just released"
        except (OSError, ValueError, KeyError, TypeError):
            if age > 10:  # a lock file is written in one go: garbage that stays is no owner's
                return "an unreadable lock", "its content is unreadable"
            return "a trainer that is writing it now", None
        who = f"host {host}, pid {pid}" + (
            f", SLURM job {owner['slurm_job']}" if "slurm_job" in owner else ""
        )
        who += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}"
        who += f", last heartbeat {age:.0f} s ago"
        if host == socket.gethostname() and not _alive(pid):
            return who, f"its owner ({who}) is no longer running"
        if age > self.STALE_AFTER_S:
            return who, f"its owner ({who}) stopped refreshing it"
        return who, None

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            for path in self._owned:
                with contextlib.suppress(OSError):
                    os.utime(path)

    def release(self) -> None:
        self._stop.set()
        for path in self._owned:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
        self._owned = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
