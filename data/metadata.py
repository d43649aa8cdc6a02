"""The JSON file beside every indexed dataset (``<prefix>.json``): tokenizer, counts and a fingerprint.

It is written last, after ``<prefix>.bin`` and ``<prefix>.idx`` are complete, so its presence is what
marks a finished output. The reading side checks it against the model's vocabulary and mask id.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version={raw.get('format_version')}, this Tandem writes "
                f"{FORMAT_VERSION}; re-run preprocessing for {prefix} with --overwrite"
            )
        raw["tokenizer"] = TokenizerInfo(**raw["tokenizer"])
        return cls(**raw)


def metadata_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temp file, fsync and rename: readers see all of it or none of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
