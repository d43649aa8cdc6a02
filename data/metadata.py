"""The JSON file beside every indexed dataset (``<prefix>.json``): tokenizer, counts and a fingerprint.

It is written last, after ``<prefix>.bin`` and ``<prefix>.idx`` are complete, so its presence is what
marks a finished output. The reading side checks it against the model's vocabulary and mask id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.tokenizer import TokenizerInfo

# Bump when the bytes written for the same input and tokenizer change: old outputs then count as stale.
FORMAT_VERSION = 1


def preprocess_hint(prefix: str | Path) -> str:
    """The commands that create ``prefix``, for error messages."""
    return (
        f"create it with `python scripts/preprocess_data.py --input FILE [FILE ...] --output-prefix {prefix} "
        f"--tokenizer TOKENIZER_DIR` (it resumes an interrupted run), or for the bundled demo corpora "
        f"`python scripts/prepare_demo_data.py --out DIR`"
    )


class DataError(ValueError):
    """A dataset prefix that cannot be read as written (missing, truncated, swapped or garbage files)."""


# megatron.core's .idx: header, version, dtype code, sequence and document counts, then per sequence an
# int32 length and an int64 byte offset, then int64 document boundaries.
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_PREAMBLE = struct.Struct("<9sQBQQ")
_IDX_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float64",
    7: "float32",
    8: "uint16",
}


@dataclass(frozen=True)
class DatasetMetadata:
    fingerprint: str
    tokenizer: TokenizerInfo
    # Documents written (one sequence each, EOD appended) and tokens written, EOD included.
    documents: int
    tokens: int
    characters: int
    # Input rows with empty or missing text, not written.
    skipped_documents: int
    # numpy dtype of the token ids in <prefix>.bin.
    dtype: str
    # What was read (files with sizes and mtimes, a datasets name, or a bundled corpus).
    source: dict
    format_version: int = FORMAT_VERSION

    @property
    def chars_per_token(self) -> float:
        """The tokenizer's compression on this text (the EOD tokens we appended not counted)."""
        return self.characters / max(1, self.tokens - self.documents)

    def write(self, prefix: str | Path) -> None:
        """Write ``<prefix>.json`` atomically (temp file + fsync + rename)."""
        write_atomic(metadata_path(prefix), json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, prefix: str | Path) -> DatasetMetadata:
        """The metadata of a finished output; FileNotFoundError naming the prefix and the fix otherwise."""
        path = metadata_path(prefix)
        missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx", str(path)) if not os.path.exists(p)]
        if missing:
            unfinished = len(missing) < 3
            raise FileNotFoundError(
                f"dataset prefix {prefix}: missing {', '.join(missing)}"
                + (" (preprocessing did not finish)" if unfinished else "")
                + f"; {preprocess_hint(prefix)}"
            )
        try:
            raw = json.loads(path.read_bytes().decode())
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
            raise DataError(
                f"{path} is not valid JSON ({err}): the metadata file is damaged; re-run preprocessing for "
                f"{prefix} with --overwrite"
            ) from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            version = raw.get("format_version") if isinstance(raw, dict) else None
            raise DataError(
                f"{path} has format_version={version}, this Tandem writes "
                f"{FORMAT_VERSION}; re-run preprocessing for {prefix} with --overwrite"
            )
        try:
            raw["tokenizer"] = TokenizerInfo(**raw["tokenizer"])
            return cls(**raw)
        except (KeyError, TypeError) as err:
            raise DataError(
                f"{path} lacks or misnames fields ({err}): the metadata file is damaged; re-run "
                f"preprocessing for {prefix} with --overwrite"
            ) from None

    def check_files(self, prefix: str | Path) -> None:
        """``DataError`` unless ``<prefix>.bin`` and ``.idx`` are the files this metadata describes: sizes,
        the index header and its last entry (a few bytes read, whatever the size of the data)."""
        bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        fix = f"re-run preprocessing for {prefix} with --overwrite"
        itemsize = np.dtype(self.dtype).itemsize
        bin_size, idx_size = bin_path.stat().st_size, idx_path.stat().st_size
        if bin_size != self.tokens * itemsize:
            raise DataError(
                f"{bin_path} has {bin_size} bytes but {metadata_path(prefix)} records {self.tokens} tokens "
                f"of {self.dtype} ({self.tokens * itemsize} bytes): truncated, swapped or from another "
                f"preprocessing run; {fix}"
            )
        with open(idx_path, "rb") as f:
            preamble = f.read(_IDX_PREAMBLE.size)
            if len(preamble) < _IDX_PREAMBLE.size:
                raise DataError(
                    f"{idx_path} has {idx_size} bytes, too few for an index header: truncated; {fix}"
                )
            header, version, code, sequences, documents = _IDX_PREAMBLE.unpack(preamble)
            if header != _IDX_HEADER or version != 1 or _IDX_DTYPES.get(code) != self.dtype:
                raise DataError(
                    f"{idx_path} does not start with a megatron index header for {self.dtype} tokens "
                    f"(garbage, or the index of another dataset); {fix}"
                )
            expected = _IDX_PREAMBLE.size + sequences * 12 + documents * 8
            if idx_size != expected or sequences == 0:
                raise DataError(
                    f"{idx_path} has {idx_size} bytes; its header ({sequences} sequences, {documents} "
                    f"document boundaries) needs {expected}: truncated or damaged; {fix}"
                )
            f.seek(_IDX_PREAMBLE.size + (sequences - 1) * 4)
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_IDX_PREAMBLE.size + sequences * 4 + (sequences - 1) * 8)
            (last_pointer,) = struct.unpack("<q", f.read(8))
        if last_pointer + last_length * itemsize != bin_size:
            raise DataError(
                f"{idx_path} indexes {last_pointer + last_length * itemsize} bytes of tokens but {bin_path} "
                f"has {bin_size}: the .bin and .idx are not a pair (swapped?) or the index is damaged; {fix}"
            )


def metadata_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through ``<path>.tmp``, fsync and rename: readers see all of it or none of it,
    and a write that fails (a full disk) leaves no temp file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
