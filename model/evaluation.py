"""An export scored by lm-evaluation-harness: ``TandemLM``, the harness's model interface over an
NLD-format export folder, in any decoding mode.

- ``loglikelihood`` and ``loglikelihood_rolling`` score text with the clean causal (AR) path, one
  right-padded batch per forward pass. Scores are log-probabilities under the distribution the
  decoders choose tokens from: the mask token, which is never emitted, gets none of the mass. For a
  model imported from a plain causal LM (whose vocabulary gained the mask token) these are exactly
  the source model's scores.
- ``generate_until`` decodes in ``mode`` (ar, diffusion, self_spec, self_spec_fused) with the export's
  batched decoders; every row stops at the first stop sequence of its request (or EOS), checked after
  each emitted token, and the returned text is cut before it. Forward passes (NFE), tokens and
  tokens per forward (TPF) are recorded per request in ``generations``; ``generation_summary``
  totals them.

Tokenization, the empty-context prefix token, left truncation and stop handling follow the
harness's own ``hf`` model, so an export of an imported model scores as that model does under
``hf``. Registered with the harness as ``tandem`` by ``train.evaluation`` (which also takes checkpoint
folders, exporting them on the fly).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from model.hf import load_export, mode_named
from model.hf.config_json import HF_DTYPES
from model.hf.tandem_decoding import tokens_per_forward

# Weights' dtype in evaluation: the export dtypes, and float64 for checks free of near-tie flips.
DTYPES = {**HF_DTYPES, "float64": torch.float64}


@dataclass
class RequestRecord:
    """One generate_until request as decoded."""

    task: str | None
    doc_id: int | None
    mode: str
    ids: list[int]  # generated tokens, up to and including the one that completed a stop sequence
    nfe: int  # forward passes this row took part in, every kind counted
    passes: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # self-speculation: drafts kept per iteration

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def tpf(self) -> float:
        return tokens_per_forward(self.tokens, self.nfe)

    def as_json(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "tpf": self.tpf}


def _stop_check(tokenizer, until: list[str]):
    """True once the decoded tokens contain one of ``until``."""
    stops = [s for s in until if s]

    def stop(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stops)

    return stop if stops else None


class TandemLM(TemplateLM):
    """The harness's model interface over an NLD-format export folder (``pretrained``).

    Model args: ``mode`` (ar | diffusion | self_spec | self_spec_fused), ``block_length``,
    ``threshold`` (diffusion: commit confidence; self_spec: draft confidence), ``temperature`` (None:
    the request's own, 0 unless it samples), ``batch_size``, ``max_gen_toks``, ``dtype``, ``device``,
    ``seed`` (sampling)."""

    def __init__(
        self,
        pretrained: str,
        mode: str = "ar",
        block_length: int | None = None,
        threshold: float | None = None,
        temperature: float | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        seed: int = 0,
        **_ignored,
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported; give a number")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_export(pretrained, dtype=DTYPES[dtype], device=device)
        self.pretrained = str(pretrained)
        self._set_mode(mode, block_length, threshold)
        self.temperature = None if temperature is None else float(temperature)
        self.batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.seed = int(seed)
        self.mask_id = self.model.config.mask_token_id
        # (scored tokens, continuation) -> (log-probability, greedy): scores do not depend on the mode.
        self._scores: dict[tuple, tuple[float, bool]] = {}
        self._reset_generations()

    def _set_mode(self, mode: str, block_length: int | None, threshold: float | None) -> None:
        """Decode in the mode named ``mode`` with the given options (the mode refuses one it does not
        take; None: the mode's default)."""
        chosen = mode_named(mode)
        options = {}
        if block_length is not None:
            options["block_length"] = int(block_length)
        if threshold is not None:
            options["threshold"] = float(threshold)
        chosen.refuse_unknown(options)
        self.mode = chosen.name
        self.mode_options = options

    def _reset_generations(self) -> None:
        self.generations: list[RequestRecord] = []
        self.generation_seconds = 0.0
        self.batched_passes = 0

    def with_mode(self, mode: str, block_length: int | None = None, threshold: float | None = None):
        """The same loaded model decoding in ``mode``, with fresh generation records; it shares this
        one's loglikelihood scores, so a second mode scores no text again."""
        other = copy.copy(self)
        other._set_mode(mode, block_length, threshold)
        other._reset_generations()
        return other

    # ---- the harness's model properties --------------------------------------------------------

    @property
    def device(self):
        return self.model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            options = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ----------------------------------------------------------------------------

    def causal_log_probs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per row of token ids, the log-probabilities [len, V] of each next token under the clean
        causal path (the mask token excluded), from one right-padded forward pass."""
        width = max(map(len, rows))
        batch = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        with torch.no_grad():
            logits = self.model(batch, dlm_paradigm="autoregressive").logits  # [B, S, V]
        logits[..., self.mask_id] = float("-inf")
        log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return [log_probs[i, : len(row)] for i, row in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p(continuation | context), continuation is the greedy one) per (key, context, cont)."""
        inputs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append((tuple(whole[:-1]), tuple(continuation)))
        results: list[tuple[float, bool] | None] = [self._scores.get(key) for key in inputs]
        order = sorted((i for i, r in enumerate(results) if r is None), key=lambda i: -len(inputs[i][0]))
        bar = tqdm(total=len(order), disable=disable_tqdm, desc="loglikelihood (tandem)")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = self.causal_log_probs([inputs[i][0] for i in chunk])
            for i, log_probs in zip(chunk, rows, strict=True):
                continuation = inputs[i][1]
                scored = log_probs[-len(continuation) :]  # [C, V]
                target = torch.tensor(list(continuation), device=scored.device)
                total = float(scored.gather(-1, target[:, None]).sum())
                greedy = bool((scored.argmax(-1) == target).all())
                results[i] = self._scores[inputs[i]] = (total, greedy)
            bar.update(len(chunk))
        bar.close()
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of at most ``max_length`` tokens, the first
        conditioned on the prefix token, each later one on the tokens before it. The text is encoded
        without special tokens, so a tokenizer that puts the document-start token in front itself
        (Tandem's) does not score it twice; for one that adds nothing this is the ``hf`` model's
        encoding."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owners, scores, strict=True):
            totals[index] += log_prob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------

    def _decode_options(self, temperature: float) -> dict:
        options: dict = {"temperature": temperature, **self.mode_options}
        if temperature > 0:
            options["generator"] = torch.Generator(device=self.device).manual_seed(self.seed)
        return options

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"generate_until (tandem, {self.mode})")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
            max_new = kwargs.pop("max_gen_toks")
            temperature = self.temperature if self.temperature is not None else kwargs.get("temperature", 0.0)
            # Room for the new tokens and the blocks a pass may place beyond them.
            context_room = self.max_length - max_new - 2 * self.model.config.block_size
            if context_room < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0])[-context_room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self._generate(
                    [contexts[i] for i in chunk], [requests[i] for i in chunk], until, max_new, temperature
                )
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, contexts, requests, until: list[str], max_new: int, temperature: float) -> list[str]:
        width = max(map(len, contexts))
        prompt = torch.full((len(contexts), width), self.prefix_token_id, dtype=torch.long)
        attention = torch.zeros(len(contexts), width, dtype=torch.long)
        for i, ids in enumerate(contexts):
            prompt[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        start = time.perf_counter()
        _, passes = self.model.decode(
            prompt.to(self.device),
            self.mode,
            attention_mask=attention.to(self.device),
            max_new_tokens=max_new,
            stop=_stop_check(self.tokenizer, until),
            **self._decode_options(temperature),
        )
        self.generation_seconds += time.perf_counter() - start
        self.batched_passes += passes
        texts = []
        for row, req in zip(self.model.last_decoded_rows, requests, strict=True):
            self.generations.append(
                RequestRecord(
                    getattr(req, "task_name", None),
                    getattr(req, "doc_id", None),
                    self.mode,
                    list(row.tokens),
                    row.nfe,
                    dict(row.passes),
                    list(row.accepted),
                )
            )
            texts.append(postprocess_generated_text(self.tok_decode(row.tokens), until, None))
        return texts

    def generation_summary(self) -> dict:
        """Totals over the generate_until requests so far: tokens, per-row passes, TPF (tokens over
        per-row passes), batched passes, seconds and tokens/s."""
        tokens = sum(r.tokens for r in self.generations)
        nfe = sum(r.nfe for r in self.generations)
        return {
            "mode": self.mode,
            "requests": len(self.generations),
            "tokens": tokens,
            "nfe": nfe,
            "tpf": tokens_per_forward(tokens, nfe),
            "batched_passes": self.batched_passes,
            "seconds": self.generation_seconds,
            "tokens_per_s": tokens / self.generation_seconds if self.generation_seconds else 0.0,
        }
