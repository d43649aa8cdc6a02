"""Evaluate an export (or a checkpoint, exported on the fly) with lm-evaluation-harness, per decoding mode.

    python scripts/evaluate.py --model exports/quickstart --tasks tandem_offline \
        --mode ar self_spec [--block-length 16] [--threshold 0.9] [--temperature 0] [--limit 20] \
        [--batch-size 8] [--out eval/quickstart] [--held-out runs/quickstart]

--tasks takes harness task names: the offline tasks (tandem_offline, or tandem_cloze, tandem_heldout,
tandem_arithmetic, tandem_copy; written into --tasks-dir on first use from the demo corpora) and any
standard task, which needs its dataset from a reachable hub. Each --mode runs the tasks once; its
results JSON (the harness's, plus the generation figures and one record per generate_until request)
goes to OUT/results_<mode>.json, and a table of the accuracy per task and mode, TPF and tokens/s to
OUT/table.md and the console. --held-out RUN scores the run's held-out data as its validation does
(AR perplexity, diffusion NELBO per token) into OUT/held_out.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.eval_tasks import GROUP, TASKS, tasks_written, write_tasks
from model.hf import MODES, mode_named
from model.hf.config_json import HF_DTYPES

# The decoding options of the command line, each passed to the modes that take it.
DECODING_OPTIONS = ("block_length", "threshold")
# The figure reported per task, first found first.
METRICS = ("acc,none", "exact_match,strip", "exact_match,none", "word_perplexity,none", "acc_norm,none")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="an export folder, or a Tandem run / checkpoint folder"
    )
    parser.add_argument("--tasks", nargs="*", default=[GROUP], help="none: only --held-out")
    parser.add_argument("--mode", nargs="+", default=["ar"], choices=sorted(MODES))
    parser.add_argument("--block-length", type=int)
    parser.add_argument("--threshold", type=float, help="diffusion: commit confidence; self_spec: draft")
    parser.add_argument("--temperature", type=float, help="default: each request's own (0 = greedy)")
    parser.add_argument("--limit", type=int, help="documents per task")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=sorted(HF_DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tasks-dir", default=".cache/tandem/eval_tasks", help="where the offline tasks live"
    )
    parser.add_argument("--held-out", help="a run folder or config.yaml whose held-out data to score")
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides of that config, e.g. logging.eval_iters=4"
    )
    parser.add_argument("--out", default="eval", help="folder for the results")
    parser.add_argument("--log-samples", action="store_true", help="keep every document's responses")
    return parser.parse_args(argv)


def model_args(args: argparse.Namespace, mode: str, pretrained: str) -> dict:
    values = {
        "pretrained": pretrained,
        "mode": mode,
        "batch_size": args.batch_size,
        "max_gen_toks": args.max_gen_toks,
        "dtype": args.dtype,
        "device": args.device,
    }
    # One command line serves several modes: each gets the decoding options it takes.
    for option in DECODING_OPTIONS:
        if option in mode_named(mode).options and getattr(args, option) is not None:
            values[option] = getattr(args, option)
    if args.temperature is not None:
        values["temperature"] = args.temperature
    return values


def headline(task_results: dict) -> tuple[str, float] | None:
    for key in METRICS:
        if key in task_results:
            return key.split(",")[0], task_results[key]
    return None


def table(rows: list[dict]) -> str:
    """Markdown: one row per (mode, task) with its headline figure, then TPF and tokens/s per mode."""
    lines = ["| mode | task | metric | value | TPF | tokens/s |", "|---|---|---|---|---|---|"]
    for row in rows:
        summary = row["generation"]
        speed = f"{summary['tpf']:.2f} | {summary['tokens_per_s']:.1f}" if summary["requests"] else "- | -"
        for task, results in sorted(row["results"].items()):
            figure = headline(results)
            if figure is not None:
                lines.append(f"| {row['mode']} | {task} | {figure[0]} | {figure[1]:.4f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from model.hf import load_export
    from train import evaluation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not tasks_written(args.tasks_dir):
        write_tasks(args.tasks_dir)
    # Indexing the harness's own task files takes a while; skip it when only the offline tasks are asked.
    offline = all(t == GROUP or t in TASKS for t in args.tasks)
    tasks = TaskManager(include_path=str(Path(args.tasks_dir).resolve()), include_defaults=not offline)
    rows = []
    try:
        first = evaluation.Tandem(**model_args(args, args.mode[0], args.model))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pretrained = first.pretrained  # the export (made once when --model is a checkpoint)
    for mode in args.mode if args.tasks else []:
        # One loaded model for every mode; loglikelihood tasks are scored once (they do not depend on it).
        options = {k: v for k, v in model_args(args, mode, pretrained).items() if k in DECODING_OPTIONS}
        lm = first.with_mode(mode, **options)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=args.tasks,
            task_manager=tasks,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            log_samples=args.log_samples,
        )
        summary = lm.generation_summary()
        results["tandem"] = {
            "model_args": {k: str(v) for k, v in model_args(args, mode, pretrained).items()},
            "generation": summary,
            "requests": [r.as_json() for r in lm.generations],
        }
        (out / f"results_{mode}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        rows.append({"mode": mode, "results": results["results"], "generation": summary})
    if rows:
        text = table(rows)
        (out / "table.md").write_text(text + "\n")
        print(text)
    if args.held_out:
        model, _ = load_export(pretrained, dtype=HF_DTYPES[args.dtype], device=args.device)
        scores = evaluation.held_out_losses(model, evaluation.run_config(args.held_out, args.set))
        (out / "held_out.json").write_text(json.dumps(scores, indent=2) + "\n")
        print("\nheld-out: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())))
    print(f"\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
