"""The weight files of a Hugging Face folder (safetensors), read and written a tensor at a time, so
that converting an 8B/14B model needs memory for about one tensor, not a copy of the model.

- ``write_safetensors``: ``model.safetensors``, or shards of at most ``SHARD_SIZE`` with
  ``model.safetensors.index.json``, each tensor appended as it is converted;
- ``SafetensorsSource``: a folder's tensors, read and converted one ``keymap.Entry`` at a time, its
  sizes and dtypes checked from the files' headers before anything is read. Pickled weights are never
  loaded.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from model.config import ConfigError, ModelConfig
from model.hf import keymap

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SHARD_SIZE = "5GB"
# Weight files that are Python pickles (torch.save): refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class _SafetensorsFile:
    """A safetensors file written a tensor at a time.

    safetensors' ``save_file`` takes every tensor of the file at once: a whole shard (up to SHARD_SIZE,
    the whole model below it) in memory, and twice that in the versions that copy the tensors to
    bytes first. The format is a little-endian u64 header length, a JSON header (name -> dtype,
    shape, byte range) and the tensors' bytes back to back; the header is fixed here from
    ``planned`` (meta tensors, in write order), and each tensor is appended as it is converted."""

    def __init__(self, file, name: str, planned: dict[str, torch.Tensor]):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor_name, tensor in planned.items():
            size = tensor.numel() * tensor.element_size()
            header[tensor_name] = {
                "dtype": SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps the tensors 8-byte aligned, as safetensors itself does
        self.name, self._file, self._planned = name, file, iter(planned.items())
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        got = (name, tuple(tensor.shape), tensor.dtype)
        planned = next(self._planned, None)
        expected = None if planned is None else (planned[0], tuple(planned[1].shape), planned[1].dtype)
        if got != expected:
            raise RuntimeError(f"{self.name}: got {got}; the header planned {expected or 'no more tensors'}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def check_complete(self) -> None:
        left = next(self._planned, None)
        if left is not None:
            raise RuntimeError(f"{self.name}: its tensor {left[0]} was never written")


def write_safetensors(
    folder: Path, planned: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """``model.safetensors``, or shards of at most SHARD_SIZE with ``model.safetensors.index.json``, in
    ``folder``: ``planned`` gives every tensor's name, shape and dtype in write order (meta tensors,
    no data); ``tensors`` then yields each (name, tensor) in that order, one at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(planned, max_shard_size=SHARD_SIZE)
    with contextlib.ExitStack() as stack:
        files = {
            filename: _SafetensorsFile(
                stack.enter_context(open(folder / filename, "wb")), filename, {n: planned[n] for n in names}
            )
            for filename, names in split.filename_to_tensors.items()
        }
        for name, tensor in tensors:
            files[split.tensor_to_filename[name]].write(name, tensor)
        for file in files.values():
            file.check_complete()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class SafetensorsSource:
    """The tensors of a Hugging Face folder's safetensors files, read and converted an entry at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                self._file_of = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise FileNotFoundError(
                f"{folder} has no model.safetensors (or index); only safetensors weights are read"
                + (
                    f": {', '.join(pickles[:3])} are pickles, which can run code when loaded, and are "
                    "never unpickled here; convert them to safetensors where you trust them"
                    if pickles
                    else ""
                )
            )

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...] | None:
        """A stored tensor's shape, from its file's header (nothing is read); None when absent."""
        from safetensors import safe_open

        if name not in self._file_of:
            return None
        with safe_open(str(self._file_of[name]), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def check_sizes(self, layout: keymap.HfLayout, model: ModelConfig) -> None:
        """``ConfigError`` when config.json's sizes are not those of the stored weights (an absurd or
        mismatched config is refused from the headers, before anything is allocated)."""
        embedding = f"{layout.prefix}embed_tokens.weight"
        down = f"{layout.prefix}layers.0.mlp.down_proj.weight"
        expected = {
            embedding: (model.vocab_size, model.hidden_size),
            down: (model.hidden_size, model.ffn_hidden_size),
        }
        for name, shape in expected.items():
            stored = self.shape(name)
            if stored is not None and stored != shape:
                raise ConfigError(
                    f"config.json's sizes (vocab_size, hidden_size, intermediate_size) make {name} "
                    f"{list(shape)} but the weights store {list(stored)}: the config does not belong to them"
                )
        layers = f"{layout.prefix}layers."
        stored = {int(n[len(layers) :].split(".")[0]) for n in self._file_of if n.startswith(layers)}
        if stored and stored != set(range(model.num_layers)):
            raise ConfigError(
                f"config.json num_hidden_layers={model.num_layers} but the weights hold {len(stored)} layers"
            )

    def dtypes(self) -> set[str]:
        """The safetensors dtype names (``BF16``, ``F32``, ...) of the stored tensors, from the headers."""
        from safetensors import safe_open

        found = set()
        for path in set(self._file_of.values()):
            with safe_open(str(path), "pt") as f:
                found |= {f.get_slice(n).get_dtype() for n, p in self._file_of.items() if p == path}
        return found

    def convert(self, entry: keymap.Entry, cfg: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
        """``entry``'s whole Megatron tensor, in ``dtype`` and in memory of its own."""
        from safetensors import safe_open

        missing = [n for n in entry.hf if n not in self._file_of]
        if missing:
            raise KeyError(keymap.missing_hf_message(missing[0], entry))
        read = {}
        # The tensors view the file's mapping, and every page read stays resident while it is open:
        # one opening per entry keeps one entry resident instead of the whole file.
        for path in dict.fromkeys(self._file_of[n] for n in entry.hf):
            with safe_open(str(path), "pt") as f:
                read.update({n: f.get_tensor(n) for n in entry.hf if self._file_of[n] == path})
        tensor = keymap.entry_from_hf(entry, [read[n] for n in entry.hf], cfg).to(dtype)
        # A conversion that only renames hands back the source tensor itself, a view of the mapping.
        if any(tensor.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in read.values()):
            tensor = tensor.clone()
        return tensor
