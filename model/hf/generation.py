"""One decode of a loaded export, timed, for the command line, the benchmark, the quickstart and the
golden record; and prompts encoded exactly as the export's tokenizer does.

The decoding itself is the export's remote code (``NemotronLabsDiffusionModel.decode``); a mode is
named here, and the loaded model looks it up in its own copy of ``tandem_decoding.MODES``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model.hf.tandem_decoding import tokens_per_forward


@dataclass
class Generation:
    mode: str
    text: str
    ids: list[int]  # generated ids (prompt excluded)
    nfe: int
    seconds: float
    passes: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)

    @property
    def tpf(self) -> float:
        return tokens_per_forward(len(self.ids), self.nfe)

    def as_json(self) -> dict:
        return {
            "mode": self.mode,
            "text": self.text,
            "ids": self.ids,
            "nfe": self.nfe,
            "tpf": self.tpf,
            "seconds": self.seconds,
            "passes": self.passes,
            "accepted": self.accepted,
        }


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """``prompt`` as the exported tokenizer encodes it by default, ``tokenizer(prompt)`` (a Tandem
    tokenizer puts the document-start EOD in front itself), so every path agrees with stock
    transformers token for token."""
    return torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)


def decode(
    model, tokenizer, prompt_ids: torch.Tensor, mode: str, max_new_tokens: int, **options
) -> Generation:
    """``prompt_ids`` [1, P] decoded by ``model`` in the mode named ``mode`` with its ``options`` (and
    ``decode``'s own: temperature, generator, eos_token_id, ...), timed."""
    if not hasattr(model, "decode"):
        raise ValueError(
            "this export's remote code has no decode method; it was written by an older Tandem: export "
            "the checkpoint again with scripts/export_hf.py --overwrite"
        )
    prompt_ids = prompt_ids.to(model.device)
    start = time.perf_counter()
    out, nfe = model.decode(prompt_ids, mode, max_new_tokens=max_new_tokens, **options)
    seconds = time.perf_counter() - start
    new = out[0, prompt_ids.shape[1] :].tolist()
    details = model.last_decoded
    return Generation(
        mode, tokenizer.decode(new), new, nfe, seconds, dict(details.passes), list(details.accepted)
    )
