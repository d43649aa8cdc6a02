"""Decoding benchmark for an exported model: TPF and speed of each mode against AR, measured in one run.

    python scripts/bench_generate.py --model exports/quickstart [--prompts 12] [--max-new-tokens 64]
    python scripts/bench_generate.py --model exports/records_demo --prompt-set records [--prompts 16]
        [--modes ar,self_spec] [--compare-stock] [--profile self_spec] [--json bench.json]

Prompt sets (always the first N, never a selection), each prompt encoded as ``tokenizer(text)`` like
the CLI (``encode_prompt``):
- ``demo`` (default): openings (8 words) of held-out Wikipedia documents of the demo corpus, or a fixed
  list when the corpus is not installed;
- ``records``: openings (header and first lines, ``--opening-lines``) of the held-out documents of
  the records corpus (data/records.py, ``--records-seed``); generated lines are checked against the
  format's rules.

Greedy by default (``--temperature`` > 0 samples instead, each prompt from its own seeded generator,
the same in every setting); one untimed warm-up decode first; with ``--repeats`` each setting is timed
that many times and the median is reported. Reported, batch 1, per setting:
- TPF (tokens per forward pass, every pass counted: prefill, denoise, append, draft, verify, redraft),
  tokens/s and the speed ratio to AR;
- for self-speculation (two-pass, fused, fused with ``redraft``): acceptance per pass, i.e. tokens
  emitted and drafts kept per verify pass, the share of drafted slots kept, and the passes by kind;
- agreement with AR: the share of AR's tokens reproduced at the same place, and on how many prompts
  the whole output equals AR's (greedy self-speculation must give all of them; sampled, only its
  distribution is AR's, so outputs may differ);
- for records prompts, the share of generated complete lines that keep every rule of the format;
- sweeps: diffusion threshold, self-speculation draft refinement (``draft_steps``, draft threshold),
  block length.
Then batch scaling: tokens/s of each mode at ``--batch-sizes`` (left-padded prompts through the batched
decoder; the same first N prompts at every size, N the largest size), and whether each row equals its
batch-1 output. ``--compare-stock`` also decodes greedily with stock ``transformers`` ``generate``
(the same weights in ``LlamaForCausalLM``, the mask token suppressed as in our decoders) against our
AR decoding, the two timed in turn on each prompt; ``--profile MODE`` writes a torch.profiler table
of one decode of the first prompt.
A PNG of TPF, speed-up and batch scaling goes beside the JSON (or the model folder, or ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.hf import MODES, decode, encode_prompt, load_export
from model.hf.tandem_decoding import tokens_per_forward

FALLBACK_PROMPTS = [
    "The river",
    "In 1905, the",
    "The city of",
    "Photosynthesis is",
    "The king said",
    "A large number of",
    "The history of",
    "Mathematics is the",
    "During the war",
    "The population of",
    "Music is",
    "The first",
]
# The modes of the batch-scaling table, each at its default options (diffusion at threshold 0.9).
BATCH_MODES = {
    "ar": {},
    "diffusion": {"threshold": 0.9},
    "self_spec": {},
    "self_spec_fused": {},
}


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: torch.Tensor  # [1, P]


@dataclass(frozen=True)
class Setting:
    name: str
    mode: str
    options: dict = field(default_factory=dict)


def demo_prompts(tokenizer, count: int) -> list[Prompt]:
    """Openings of held-out Wikipedia documents from the demo corpus, or a fixed list."""
    try:
        from data.corpora import WIKI, split_corpus

        texts = [" ".join(text.split()[:8]) for text in split_corpus(WIKI)["valid"][:count]]
    except Exception:
        texts = [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(count)]
    return [Prompt(t, encode_prompt(tokenizer, t)) for t in texts]


def records_prompts(tokenizer, count: int, seed: int, lines: int) -> list[Prompt]:
    """Openings of the first ``count`` held-out records documents (the exported tokenizer puts the
    document-start EOD in front, as in the training stream)."""
    from data.records import held_out_documents, opening

    texts = [opening(document, lines) for document in held_out_documents(count, seed)]
    return [Prompt(t, encode_prompt(tokenizer, t)) for t in texts]


def valid_line_share(tokenizer, prompts: list[Prompt], outputs: list[list[int]]) -> float:
    """Of the complete lines generated after every prompt, the share that keep the records format."""
    from data.records import check_records

    checked = []
    for prompt, ids in zip(prompts, outputs, strict=True):
        text = prompt.text + tokenizer.decode(ids, skip_special_tokens=True)
        checked += check_records(text)[prompt.text.count("\n") :]
    return sum(problem is None for problem in checked) / max(len(checked), 1)


def _sampling(temperature: float, prompt_index: int) -> dict:
    if temperature <= 0:
        return {}
    return {"temperature": temperature, "generator": torch.Generator().manual_seed(prompt_index)}


def measure(
    model, tokenizer, prompts: list[Prompt], setting: Setting, max_new: int, repeats: int, temperature
):
    """Decode every prompt ``repeats`` times at batch 1; counts from the first run (repeats are equal:
    greedy, or sampled with the same seeds), time as the median over runs of the total."""
    totals, first = [], None
    for _ in range(repeats):
        results = [
            decode(
                model, tokenizer, p.ids, setting.mode, max_new, **setting.options, **_sampling(temperature, i)
            )
            for i, p in enumerate(prompts)
        ]
        totals.append(sum(r.seconds for r in results))
        first = first or results
    tokens = sum(len(r.ids) for r in first)
    nfe = sum(r.nfe for r in first)
    seconds = statistics.median(totals)
    passes: dict[str, int] = {}
    for r in first:
        for kind, count in r.passes.items():
            passes[kind] = passes.get(kind, 0) + count
    row = {
        "mode": setting.mode,
        "options": setting.options,
        "tokens": tokens,
        "nfe": nfe,
        "tpf": tokens_per_forward(tokens, nfe),
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "passes": passes,
        "outputs": [r.ids for r in first],
    }
    if passes.get("verify"):
        accepted = [a for r in first for a in r.accepted]
        block = setting.options.get("block_length", model.config.block_size)
        row["tokens_per_verify"] = tokens / passes["verify"]
        row["accepted_per_verify"] = statistics.mean(accepted)
        row["accepted_share"] = sum(accepted) / (len(accepted) * (block - 1))
    return row


def compare_to(rows: dict, reference: dict) -> None:
    """Agreement and speed of each row against ``reference`` (AR), stored in the row."""
    for row in rows.values():
        same = sum(
            a == b
            for o, r in zip(row["outputs"], reference["outputs"], strict=True)
            for a, b in zip(o, r, strict=False)
        )
        row["ar_token_agreement"] = same / max(reference["tokens"], 1)
        row["prompts_equal_to_ar"] = sum(
            o == r for o, r in zip(row["outputs"], reference["outputs"], strict=True)
        )
        row["speed_vs_ar"] = row["tokens_per_s"] / reference["tokens_per_s"]


def settings(block: int, thresholds, draft_steps, draft_thresholds, blocks) -> list[Setting]:
    """Every batch-1 setting: the four modes and fused redraft, then the sweeps."""
    out = [Setting("ar", "ar")]
    out += [Setting(f"diffusion t={t} B={block}", "diffusion", {"threshold": t}) for t in thresholds]
    out += [
        Setting(f"self_spec B={block}", "self_spec"),
        Setting(f"self_spec_fused B={block}", "self_spec_fused"),
        Setting(f"self_spec_fused redraft B={block}", "self_spec_fused", {"redraft": True}),
    ]
    out += [Setting(f"self_spec steps={k} B={block}", "self_spec", {"draft_steps": k}) for k in draft_steps]
    out += [Setting(f"self_spec t={t} B={block}", "self_spec", {"threshold": t}) for t in draft_thresholds]
    for b in blocks:
        if b == block:
            continue
        out += [
            Setting(f"diffusion t=0.9 B={b}", "diffusion", {"block_length": b, "threshold": 0.9}),
            Setting(f"self_spec B={b}", "self_spec", {"block_length": b}),
            Setting(f"self_spec_fused B={b}", "self_spec_fused", {"block_length": b}),
        ]
    return out


def left_padded(prompts: list[Prompt], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as one left-padded batch: ids [B, P] and attention_mask [B, P]."""
    width = max(p.ids.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.ids.shape[1] :] = p.ids[0]
        mask[b, width - p.ids.shape[1] :] = 1
    return ids, mask


def batch_scaling(
    model, prompts: list[Prompt], sizes: list[int], max_new: int, temperature: float, modes
) -> dict:
    """Per mode of ``modes`` and batch size: tokens/s over all ``prompts`` decoded in batches of that
    size, batched passes, and how many rows equal their output in the smallest batch."""
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else 0
    table: dict[str, dict[int, dict]] = {}
    for mode, options in ((m, o) for m, o in BATCH_MODES.items() if m in modes):
        table[mode] = {}
        for size in sizes:
            tokens, seconds, passes, outputs = 0, 0.0, 0, []
            for first in range(0, len(prompts), size):
                chunk = prompts[first : first + size]
                ids, mask = left_padded(chunk, pad)
                sampling = {}
                if temperature > 0:
                    generators = [torch.Generator().manual_seed(first + i) for i in range(len(chunk))]
                    sampling = {"temperature": temperature, "generator": generators}
                start = time.perf_counter()
                _, nfe = model.decode(
                    ids, mode, attention_mask=mask, max_new_tokens=max_new, **options, **sampling
                )
                seconds += time.perf_counter() - start
                passes += nfe
                outputs += [row.tokens for row in model.last_decoded_rows]
            tokens = sum(map(len, outputs))
            table[mode][size] = {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "batched_passes": passes,
                "outputs": outputs,
            }
        alone = table[mode][sizes[0]]["outputs"]
        for size in sizes:
            entry = table[mode][size]
            entry["rows_equal_to_smallest_batch"] = sum(
                a == b for a, b in zip(entry["outputs"], alone, strict=True)
            )
    return table


def llama_from_export(model):
    """The export's weights in stock ``LlamaForCausalLM``, or (None, why) where Llama cannot hold them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    differs = [
        key
        for key, value in (
            ("qk_layernorm", False),
            ("attention_bias", False),
            ("mlp_bias", False),
            ("hidden_act", "silu"),
            ("sliding_window", None),
        )
        if getattr(c, key, value) != value
    ]
    if differs:
        return None, f"Llama has no {', '.join(differs)} like this export"
    llama = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=False,
        **{key: getattr(c, key, None) for key in ("eos_token_id", "bos_token_id", "pad_token_id")},
    )
    state = {
        k.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head.", 1): v
        for k, v in model.state_dict().items()
    }
    reference = LlamaForCausalLM(llama).to(dtype=model.dtype)
    reference.load_state_dict(state, strict=True)
    return reference.eval(), None


def stock_row(model, tokenizer, prompts: list[Prompt], max_new: int, repeats: int) -> dict:
    """Greedy stock ``generate`` on the same weights against our AR decoding, batch 1: the two are
    timed in turn on each prompt (ours, then stock), so that both meet the same machine load; per
    decoder the median over ``repeats`` of the total."""
    reference, why = llama_from_export(model)
    if reference is None:
        return {"skipped": why}
    c = reference.config
    options = dict(
        max_new_tokens=max_new,
        do_sample=False,
        suppress_tokens=[model.config.mask_token_id],  # our decoders never emit the mask token either
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
    )
    reference.generate(prompts[0].ids, **{**options, "max_new_tokens": min(max_new, 8)})  # warm-up
    stock_totals, ours_totals, outputs, ours = [], [], None, None
    for _ in range(repeats):
        stock_seconds, ours_seconds, run, ours_run = 0.0, 0.0, [], []
        for p in prompts:
            mine = decode(model, tokenizer, p.ids, "ar", max_new)
            ours_seconds += mine.seconds
            ours_run.append(mine.ids)
            start = time.perf_counter()
            out = reference.generate(p.ids, attention_mask=torch.ones_like(p.ids), **options)
            stock_seconds += time.perf_counter() - start
            run.append(out[0, p.ids.shape[1] :].tolist())
        stock_totals.append(stock_seconds)
        ours_totals.append(ours_seconds)
        outputs, ours = outputs or run, ours or ours_run
    stock_rate = sum(map(len, outputs)) / statistics.median(stock_totals)
    ours_rate = sum(map(len, ours)) / statistics.median(ours_totals)
    return {
        "tokens": sum(map(len, outputs)),
        "tokens_per_s": stock_rate,
        "ours_ar_tokens_per_s": ours_rate,
        "ar_speed_vs_stock": ours_rate / stock_rate,
        "prompts_equal_to_ar": sum(o == r for o, r in zip(outputs, ours, strict=True)),
        "outputs": outputs,
    }


def profile(model, tokenizer, prompt: Prompt, setting: Setting, max_new: int, path: Path) -> str:
    """A torch.profiler table (by self CPU time) of one decode; written to ``path`` and returned."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        result = decode(model, tokenizer, prompt.ids, setting.mode, max_new, **setting.options)
    sort = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    head = (
        f"one {setting.name} decode of prompt 0: {len(result.ids)} tokens in {result.nfe} passes "
        f"({result.passes}), {result.seconds:.3f} s under the profiler\n"
    )
    path.write_text(head + table)
    return head + table


def run_bench(model, tokenizer, args) -> dict:
    """Every table of the benchmark for ``model``; prints them and writes the PNG (and JSON)."""
    block = model.config.block_size
    n = args.max_new_tokens
    if args.prompt_set == "records":
        from data.records import DEFAULT_SEED

        seed = DEFAULT_SEED if args.records_seed is None else args.records_seed

        def prompt_set(count: int) -> list[Prompt]:
            return records_prompts(tokenizer, count, seed, args.opening_lines)
    else:

        def prompt_set(count: int) -> list[Prompt]:
            return demo_prompts(tokenizer, count)

    prompts = prompt_set(args.prompts)
    decode(model, tokenizer, prompts[0].ids, "ar", min(n, 8))  # warm-up: first-call costs stay untimed
    rows = {
        s.name: measure(model, tokenizer, prompts, s, n, args.repeats, args.temperature)
        for s in settings(block, args.thresholds, args.draft_steps, args.draft_thresholds, args.block_lengths)
        if s.mode in args.modes
    }
    ar = rows["ar"]
    compare_to(rows, ar)
    if args.prompt_set == "records":
        for row in rows.values():
            row["valid_lines"] = valid_line_share(tokenizer, prompts, row["outputs"])
    sampling = f"temperature {args.temperature}" if args.temperature > 0 else "greedy"
    print(
        f"{len(prompts)} {args.prompt_set} prompts x {n} new tokens, batch 1, {sampling}, "
        f"{torch.get_num_threads()} threads, {args.repeats} timed run(s) per setting (median); "
        f"trained block size {block}"
    )
    _print_table(rows, len(prompts), records=args.prompt_set == "records")
    _print_acceptance(rows)
    result = {"prompts": len(prompts), "prompt_set": args.prompt_set, "max_new_tokens": n, "rows": rows}
    speculative = {k: v for k, v in rows.items() if v["mode"].startswith("self_spec")}
    if args.temperature > 0:
        print("sampled: self-speculation keeps AR's distribution, not its outputs (no equality check)")
    elif speculative:
        lossless = all(v["prompts_equal_to_ar"] == len(prompts) for v in speculative.values())
        result["self_spec_equals_ar"] = lossless
        verdict = "yes" if lossless else "NO"
        print(f"self-speculation output == AR output on every prompt in every setting: {verdict}")

    sizes = sorted(set(args.batch_sizes))
    if sizes:
        batch_prompts = prompt_set(sizes[-1])
        result["batch"] = batch_scaling(model, batch_prompts, sizes, n, args.temperature, args.modes)
        _print_batch(result["batch"], sizes, len(batch_prompts))
    if args.compare_stock:
        stock = stock_row(model, tokenizer, prompts, n, args.repeats)
        result["stock"] = stock
        if "skipped" in stock:
            print(f"stock transformers: skipped ({stock['skipped']})")
        else:
            print(
                f"stock transformers generate (LlamaForCausalLM, greedy, batch 1, timed in turn with ours): "
                f"{stock['tokens_per_s']:.1f} tok/s; our AR {stock['ours_ar_tokens_per_s']:.1f} tok/s = "
                f"{stock['ar_speed_vs_stock']:.2f}x stock; outputs equal on "
                f"{stock['prompts_equal_to_ar']}/{len(prompts)} prompts"
            )
    plot = Path(args.plot) if args.plot else _beside(args)
    if args.profile:
        chosen = next(s for s in settings(block, [0.9], [], [], []) if s.mode == args.profile)
        path = plot.with_name(f"profile_{args.profile}.txt")
        print(profile(model, tokenizer, prompts[0], chosen, n, path).split("\n", 1)[0])
        print(f"profile table: {path}")
        result["profile"] = str(path)
    _plot(rows, result.get("batch"), plot)
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"json: {args.json}")
    return result


def _beside(args) -> Path:
    """The PNG's default place: beside the JSON when one is written, else in the model folder."""
    return Path(args.json).with_suffix(".png") if args.json else Path(args.model) / "bench_generate.png"


def _numbers(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-set", choices=("demo", "records"), default="demo")
    p.add_argument("--prompts", type=int, default=12, help="how many (the first N of the set)")
    p.add_argument("--records-seed", type=int, default=None, help="records corpus seed (default: 0)")
    p.add_argument("--opening-lines", type=int, default=3, help="records prompts: lines kept")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--thresholds", type=_numbers(float), default=[0.9, 0.7, 0.5, 0.3, 0.1])
    p.add_argument("--draft-steps", type=_numbers(int), default=[2, 4], help="self_spec draft_steps sweep")
    p.add_argument("--draft-thresholds", type=_numbers(float), default=[0.5, 0.9], help="self_spec sweep")
    p.add_argument("--block-lengths", type=_numbers(int), default=None, help="default: B/4, B/2, B")
    p.add_argument("--batch-sizes", type=_numbers(int), default=[1, 4, 16], help="'' for none")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled")
    p.add_argument("--compare-stock", action="store_true", help="also time stock transformers generate")
    p.add_argument(
        "--modes",
        type=lambda text: ["ar", *(m for m in text.split(",") if m and m != "ar")],
        default=list(MODES),
        help="modes measured, comma-separated (default: all; AR, the reference, always)",
    )
    p.add_argument("--profile", choices=tuple(MODES), help="write a torch.profiler table of one decode")
    p.add_argument("--plot", help="PNG path (default: beside --json, else <model>/bench_generate.png)")
    p.add_argument("--json", help="also write all figures to this JSON file")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        p.error("--prompts, --repeats and every --batch-sizes value must be >= 1")
    if unknown := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    torch.set_grad_enabled(False)
    model, tokenizer = load_export(args.model)
    block = model.config.block_size
    if args.block_lengths is None:
        args.block_lengths = sorted({max(2, block // 4), max(2, block // 2), block})
    run_bench(model, tokenizer, args)
    return 0


def _print_table(rows: dict, prompts: int, records: bool) -> None:
    header = (
        f"{'setting':32s} {'TPF':>6s} {'tok/s':>8s} {'vs AR':>6s} {'tok/verify':>10s} {'acc/verify':>10s} "
        f"{'=AR tok':>7s} {'=AR out':>7s}"
    )
    print(header + (f" {'valid lines':>11s}" if records else ""))
    for name, row in rows.items():
        spec = (
            f"{row['tokens_per_verify']:10.2f} {row['accepted_per_verify']:10.2f}"
            if "tokens_per_verify" in row
            else f"{'':10s} {'':10s}"
        )
        line = (
            f"{name:32s} {row['tpf']:6.3f} {row['tokens_per_s']:8.1f} {row['speed_vs_ar']:5.2f}x {spec} "
            f"{row['ar_token_agreement']:7.2f} {row['prompts_equal_to_ar']:>3d}/{prompts:<3d}"
        )
        print(line + (f" {row['valid_lines']:11.2f}" if records else ""))


def _print_acceptance(rows: dict) -> None:
    print("acceptance per pass (self-speculation): drafts kept per verify pass, share of drafted slots kept,")
    print("and the passes by kind over all prompts")
    for name, row in rows.items():
        if "accepted_per_verify" not in row:
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["passes"].items()))
        print(
            f"  {name:32s} kept/verify {row['accepted_per_verify']:5.2f}  kept share "
            f"{row['accepted_share']:5.2f}  passes: {kinds}"
        )


def _print_batch(table: dict, sizes: list[int], prompts: int) -> None:
    print(
        f"batch scaling: tokens/s over the same {prompts} prompts in batches of " + ", ".join(map(str, sizes))
    )
    print(
        f"{'mode':16s} "
        + " ".join(f"{'B=' + str(s):>9s}" for s in sizes)
        + "  rows equal to the smallest batch"
    )
    for mode, by_size in table.items():
        equal = [by_size[s]["rows_equal_to_smallest_batch"] for s in sizes]
        print(
            f"{mode:16s} "
            + " ".join(f"{by_size[s]['tokens_per_s']:9.1f}" for s in sizes)
            + "  "
            + " ".join(f"{e}/{prompts}" for e in equal)
        )


def _plot(rows: dict, batch: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3 if batch else 2, figsize=(17 if batch else 12, 0.3 * len(names) + 2))
    axes[0].barh(names, [rows[k]["tpf"] for k in names], color="tab:blue")
    axes[0].set_xlabel("tokens per forward pass (all passes)")
    axes[1].barh(names, [rows[k]["speed_vs_ar"] for k in names], color="tab:orange")
    axes[1].set_xlabel("speed vs AR (tokens/s ratio), batch 1")
    for ax in axes[:2]:
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    axes[1].set_yticklabels([])
    if batch:
        for mode, by_size in batch.items():
            sizes = sorted(by_size)
            axes[2].plot(sizes, [by_size[s]["tokens_per_s"] for s in sizes], marker="o", label=mode)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("batch size")
        axes[2].set_ylabel("tokens/s")
        axes[2].legend()
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
