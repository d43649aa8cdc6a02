"""Tokenizers: train Tandem's own byte-level BPE, or load any tokenizer folder, and describe it.

Our BPE reserves ``<|endoftext|>`` (document end, also eos/bos), ``<|pad|>`` and ``<|mask|>`` (the
diffusion mask) at ids 0, 1, 2. A loaded tokenizer without a mask token needs an explicit reserved id
(NLD uses id 100 of the Ministral vocabulary); ``TokenizerInfo`` records which id was chosen and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN, MASK_TOKEN)
# 256 byte symbols plus the reserved specials: anything smaller cannot encode every string.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the data and the model must agree on about a tokenizer folder."""

    path: str
    # len(tokenizer): the model's vocab_size before any padding for tensor parallelism.
    vocab_size: int
    # Appended after every document; also the eos token.
    eod_id: int
    # None when the tokenizer has no pad token distinct from EOD.
    pad_id: int | None
    mask_id: int
    # "mask_token" (the tokenizer's own) or "reserved_id" (chosen by the user for a tokenizer without one).
    mask_source: str
    # sha256 of the serialised tokenizer (vocabulary, merges, normalisation): same text -> same ids.
    fingerprint: str


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> TokenizerInfo:
    """Train a byte-level BPE on ``texts`` and save it as a folder that AutoTokenizer loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs >= {MIN_VOCAB_SIZE}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    _start_at_a_document_boundary(bpe)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOD_TOKEN,
        bos_token=EOD_TOKEN,  # GPT-2's convention: a prompt may start where a document ends
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Save beside the target and rename: a crash never leaves a half-written folder that loads.
    staging = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    wrapped.save_pretrained(staging)
    _portable_tokenizer_class(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return load_tokenizer_info(out_dir)


def _start_at_a_document_boundary(tokenizer) -> None:
    """Encoding text (with special tokens, the default of ``tokenizer(text)``) puts EOD in front: the
    model saw every document right after an EOD, so a prompt is a document start, and every caller
    (the CLI, the bench, stock transformers) encodes it the same way. Preprocessing encodes without
    special tokens, so the training data is unchanged."""
    from tokenizers import processors

    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOD_TOKEN} $A", pair=f"{EOD_TOKEN} $A $B", special_tokens=[(EOD_TOKEN, 0)]
    )


def starts_at_a_document_boundary(path: str | Path) -> bool:
    """True when the tokenizer folder ``path`` puts EOD in front of encoded text (see above)."""
    tokenizer = load_tokenizer(path)
    eod = tokenizer.eos_token_id
    return eod is not None and tokenizer("a")["input_ids"][:1] == [eod]


def _portable_tokenizer_class(folder: Path) -> None:
    # transformers 5 writes its new class name; serving stacks on transformers 4 only know this one.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path):
    """The transformers tokenizer in folder ``path``, loaded offline."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist; train one with "
            f"`python scripts/prepare_demo_data.py --out DIR` (writes DIR/tokenizer) or pass a folder "
            f"that transformers.AutoTokenizer loads (tokenizer.json + tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{folder} is not a tokenizer folder transformers.AutoTokenizer can load: {err}"
        ) from err


def load_tokenizer_info(path: str | Path, mask_id: int | None = None) -> TokenizerInfo:
    """Describe the tokenizer folder ``path``; ``mask_id`` picks a reserved id when it has no mask token."""
    tokenizer = load_tokenizer(path)
    vocab_size = len(tokenizer)
    eod_id = tokenizer.eos_token_id
    if eod_id is None:
        raise ValueError(
            f"tokenizer {path} has no eos token to end documents with; set eos_token in its "
            f"tokenizer_config.json"
        )
    if tokenizer.mask_token_id is not None:
        if mask_id is not None and mask_id != tokenizer.mask_token_id:
            raise ValueError(
                f"mask_id={mask_id} disagrees with the mask token {tokenizer.mask_token!r} "
                f"(id {tokenizer.mask_token_id}) of tokenizer {path}; drop mask_id to use the tokenizer's own"
            )
        mask_id, mask_source = tokenizer.mask_token_id, "mask_token"
    else:
        _check_reserved_id(tokenizer, path, mask_id)
        mask_source = "reserved_id"
    if mask_id == eod_id:
        raise ValueError(f"tokenizer {path}: the mask id {mask_id} is also the eos (end-of-document) id")
    pad_id = tokenizer.pad_token_id
    return TokenizerInfo(
        path=str(Path(path).resolve()),
        vocab_size=vocab_size,
        eod_id=eod_id,
        pad_id=None if pad_id in (None, eod_id) else pad_id,
        mask_id=mask_id,
        mask_source=mask_source,
        fingerprint=hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
    )


def _check_reserved_id(tokenizer, path, mask_id: int | None) -> None:
    # Only a special added token is safe: the tokenizer never produces it from ordinary text.
    in_use = set(tokenizer.all_special_ids)
    reserved = [i for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and i not in in_use]
    hint = f"reserved special ids of this tokenizer: {reserved[:8]}" if reserved else "it has no reserved ids"
    if mask_id is None:
        raise ValueError(
            f"tokenizer {path} has no mask token; pass a reserved special id as mask_id (--mask-id), as "
            f"NLD does with id 100 of the Ministral vocabulary ({hint})"
        )
    token = tokenizer.added_tokens_decoder.get(mask_id)
    if token is None or not token.special or mask_id in in_use:
        raise ValueError(
            f"mask_id={mask_id} is not a free reserved special token of tokenizer {path} (it could occur in "
            f"ordinary text or is already eos/bos/pad/unk); {hint}"
        )
