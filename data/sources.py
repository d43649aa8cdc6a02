"""Where documents come from: local files or folders, a `datasets` name, or texts in memory.

Each source describes itself cheaply (for the output's fingerprint, so a finished output is recognised
without reading the data) and loads as a HF ``datasets.Dataset`` with one ``text`` column. Local files
are checked first (exists, not empty, valid UTF-8, has the text key) so errors name the file and the fix.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Protocol

# File name endings -> the `datasets` builder that reads them.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}


class DocumentSource(Protocol):
    def describe(self) -> dict:
        """What identifies the input, for the fingerprint: cheap, without reading every document."""

    def load(self, cache_dir: Path):
        """The documents as a ``datasets.Dataset`` with a ``text`` column (None where text is missing)."""


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for ext, b in BUILDERS.items() if name.endswith(ext)), None)


class LocalFiles:
    """jsonl / json / parquet files (one document per record) and plain-text files (one per file)."""

    def __init__(self, paths: Sequence[str | Path], text_key: str = "text"):
        self.text_key = text_key
        self.files = [f for p in paths for f in _expand(Path(p))]
        for f in self.files:
            if f.stat().st_size == 0:
                raise ValueError(f"input file {f} is empty; remove it from --input (or its folder)")

    def __str__(self) -> str:
        more = f" (+{len(self.files) - 3} more)" if len(self.files) > 3 else ""
        return ", ".join(str(f) for f in self.files[:3]) + more

    def describe(self) -> dict:
        # Size and mtime, as make does: hashing every byte would cost as much as reading the data.
        files = [
            {"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in self.files
        ]
        return {"files": files, "text_key": self.text_key}

    def load(self, cache_dir: Path):
        import datasets

        for f in self.files:
            _check_utf8(f)
            _check_text_key(f, self.text_key)
        parts = []
        # One `load_dataset` call per run of same-format files keeps the input order.
        for builder, group in groupby(self.files, key=_builder):
            files = [str(f) for f in group]
            if builder == "text":
                part = datasets.load_dataset(
                    "text", data_files=files, split="train", sample_by="document", cache_dir=str(cache_dir)
                )
            else:
                part = datasets.load_dataset(
                    builder, data_files=files, split="train", cache_dir=str(cache_dir)
                )
                if self.text_key not in part.column_names:
                    raise ValueError(
                        f"input {', '.join(files[:3])} has no {self.text_key!r} field "
                        f"(fields: {part.column_names}); pass --text-key FIELD"
                    )
                part = _as_text_column(part, self.text_key)
            parts.append(part)
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; check the --input paths")
    if path.is_file():
        if _builder(path) is None:
            raise ValueError(f"input {path}: unknown format; use one of {', '.join(BUILDERS)}")
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and _builder(f) is not None)
    if not files:
        raise FileNotFoundError(f"input folder {path} holds no {', '.join(BUILDERS)} files")
    return files


def _as_text_column(dataset, text_key: str):
    dataset = dataset.select_columns([text_key])
    return dataset if text_key == "text" else dataset.rename_column(text_key, "text")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_utf8(path: Path) -> None:
    if _builder(path) == "parquet":  # Arrow strings are UTF-8 by construction
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open_bytes(path) as f:
        while chunk := f.read(1 << 24):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                position = offset - pending + err.start
                raise ValueError(
                    f"input file {path} is not valid UTF-8 (bad byte at offset {position}); convert it, "
                    f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed{''.join(path.suffixes)}`"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"input file {path} is not valid UTF-8 (it ends inside a character)") from None


def _check_text_key(path: Path, text_key: str) -> None:
    # The first record stands for the file: a whole file with another key is the common mistake.
    builder = _builder(path)
    if builder == "parquet":
        import pyarrow.parquet as pq

        fields = pq.read_schema(path).names
    elif builder == "json" and ".jsonl" in path.name.lower():
        with _open_bytes(path) as f:
            first = next((line for line in f if line.strip()), b"{}")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as err:
            raise ValueError(f"input file {path}: its first line is not JSON ({err})") from None
        fields = list(record) if isinstance(record, dict) else []
    else:  # plain text has no keys; whole .json files are checked after loading
        return
    if text_key not in fields:
        raise ValueError(
            f"input file {path} has no {text_key!r} field (fields: {fields}); pass --text-key FIELD"
        )


class HubDataset:
    """A dataset by name through ``datasets.load_dataset`` (needs the hub, or HF's local cache)."""

    def __init__(self, name: str, split: str = "train", config: str | None = None, text_key: str = "text"):
        self.name, self.split, self.config, self.text_key = name, split, config, text_key
        self._dataset = None

    def __str__(self) -> str:
        return f"datasets name {self.name!r} (config {self.config}, split {self.split})"

    def describe(self) -> dict:
        # The datasets library fingerprints a loaded dataset by its files; that changes when they do.
        fingerprint = self._loaded()._fingerprint
        return {"dataset": self.name, "config": self.config, "split": self.split, "fingerprint": fingerprint}

    def load(self, cache_dir: Path):
        return self._loaded()  # the hub's own cache holds it; nothing to convert into cache_dir

    def _loaded(self):
        if self._dataset is None:
            import datasets

            try:
                dataset = datasets.load_dataset(self.name, self.config, split=self.split)
            except Exception as err:  # offline, unknown name, bad split: all end here with the reason
                raise ValueError(
                    f"could not load {self}: {type(err).__name__}: {err}. Without hub access, download it "
                    f"where the hub is reachable and pass its files with --input"
                ) from err
            if self.text_key not in dataset.column_names:
                raise ValueError(
                    f"{self} has no {self.text_key!r} field (fields: {dataset.column_names}); "
                    f"pass --text-key FIELD"
                )
            self._dataset = _as_text_column(dataset, self.text_key)
        return self._dataset


class Texts:
    """Documents already in memory (the bundled corpora); ``info`` says where they came from."""

    def __init__(self, name: str, texts: Sequence[str], info: dict | None = None):
        self.name, self.texts, self.info = name, texts, info or {}

    def __str__(self) -> str:
        return f"{self.name} ({len(self.texts)} documents)"

    def describe(self) -> dict:
        digest = hashlib.sha256()
        for text in self.texts:
            data = text.encode()
            digest.update(len(data).to_bytes(8, "little") + data)
        return {"name": self.name, **self.info, "documents": len(self.texts), "sha256": digest.hexdigest()}

    def load(self, cache_dir: Path):
        import datasets

        return datasets.Dataset.from_dict({"text": list(self.texts)})
