"""A golden record of what Tandem computes: composed configs, training losses, an export, decodes.

    python -m tests.golden.record --data DEMO_DIR --out record.json      # write a record
    python -m tests.golden.record --data DEMO_DIR --compare tests/golden/quickstart.json
    python -m tests.golden.record --configs-only --compare tests/golden/quickstart.json   # seconds

The record was first written by the code before the one-source refactor; ``tests/test_golden.py``
holds every later tree to it (the refactor was to change no behaviour). It holds:

- the composed, validated config of every shipped experiment (as plain values);
- per variant of the quickstart config (a few steps of the joint, AR and diffusion objectives with
  the other masking schemes and document masks): every logged training and validation figure except
  timings;
- for the joint variant: the export's config.json and, per exported tensor, its shape, dtype, sum,
  sum of squares and first values; and greedy and sampled decodes in every mode (ids, passes).

``DEMO_DIR`` is a folder written by ``data.corpora.prepare_demo`` (the tests' ``demo_data``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

# Shared by every variant: the quickstart model and data, a few steps, one validation batch.
COMMON = [
    "experiment=quickstart",
    "steps=3",
    "global_batch_size=8",
    "micro_batch_size=4",
    "optim.warmup_steps=1",
    "logging.interval=1",
    "logging.eval_interval=3",
    "logging.eval_iters=1",
    "logging.tensorboard=false",
    "checkpoint.interval=0",
]
VARIANTS = {
    "joint": [],
    "ar": ["objective=ar"],
    "diffusion_documents": [
        "objective=diffusion",
        "data.document_masks=true",
        "objective.masking=block",
        "objective.clean_attention=block_causal",
        "objective.drafter_fraction=0.25",
    ],
    "joint_position": [
        "objective.masking=position",
        "objective.t_min=0.2",
        "objective.t_max=0.8",
        "objective.resample=true",
    ],
}
# Logged figures that measure the machine, not the computation.
TIMINGS = {"step_time", "tokens_per_s", "tflops_per_device", "mfu", "time"}
PROMPTS = ["The river", "To be, or not to be"]
MODES = ("ar", "diffusion", "self_spec", "self_spec_fused")
NEW_TOKENS = 20
# Keys the refactor removed from the schema as dead (they configured nothing).
REMOVED_KEYS = {"data.num_workers"}
# What the refactor added to the export: config.json's masking options (the export's training call
# draws the trainer's noise) and the noise module shipped for it. Nothing NLD's code reads changed.
ADDED_CONFIG_JSON_KEYS = {"masking"}
ADDED_EXPORT_FILES = {"tandem_noise.py"}
ENVIRONMENT = (
    "TANDEM_DATA",
    "TANDEM_RECORDS",
    "TANDEM_SMOLLM2",
    "TANDEM_INIT_CHECKPOINT",
    "TANDEM_DATA_PREFIX",
    "TANDEM_TOKENIZER",
)


def _plain(value):
    """Enums by value, everything else as JSON has it."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed_configs() -> dict[str, dict]:
    import dataclasses

    from train.config import CONFIG_DIR, compose_config

    saved = {name: os.environ.pop(name) for name in ENVIRONMENT if name in os.environ}
    try:
        out = {}
        for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
            cfg = compose_config([f"experiment={path.stem}"])
            out[path.stem] = _flatten(_plain(dataclasses.asdict(cfg)))
        return out
    finally:
        os.environ.update(saved)


def _train(name: str, overrides: list[str], work: Path) -> dict:
    from train.config import compose_config
    from train.logger import read_metrics
    from train.loop import run

    run_dir = work / name
    result = run(compose_config([*COMMON, *overrides, f"run_dir={run_dir}"]))
    rows = [
        {k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run_dir / "metrics.jsonl")
    ]
    return {"rows": rows, "step": result.step, "checkpoints": str(result.checkpoint_dir)}


def _tensor_summary(tensor: torch.Tensor) -> dict:
    values = tensor.double().flatten()
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype),
        "sum": float(values.sum()),
        "sum_of_squares": float((values * values).sum()),
        "first": values[:4].tolist(),
    }


def _export(checkpoints: str, work: Path) -> tuple[Path, dict]:
    from safetensors.torch import load_file

    from train.convert import export_checkpoint

    out = export_checkpoint(checkpoints, work / "hf", overwrite=True)
    tensors = load_file(str(out / "model.safetensors"))
    return out, {
        "config": json.loads((out / "config.json").read_text()),
        "files": sorted(p.name for p in out.iterdir() if p.name != "tandem_export.json"),
        "tensors": {name: _tensor_summary(t) for name, t in sorted(tensors.items())},
    }


def _decodes(model, tokenizer, prompts: list[torch.Tensor]) -> dict:
    from model.hf import decode

    out = {}
    with torch.no_grad():
        for mode in MODES:
            for index, ids in enumerate(prompts):
                greedy = decode(model, tokenizer, ids, mode, NEW_TOKENS)
                generator = torch.Generator().manual_seed(index)
                sampled = decode(
                    model, tokenizer, ids, mode, NEW_TOKENS, temperature=0.8, generator=generator
                )
                out[f"{mode} {index}"] = {
                    "prompt": ids[0].tolist(),
                    "greedy": {
                        "ids": greedy.ids,
                        "nfe": greedy.nfe,
                        "passes": greedy.passes,
                        "accepted": greedy.accepted,
                    },
                    "sampled": {
                        "ids": sampled.ids,
                        "nfe": sampled.nfe,
                        "passes": sampled.passes,
                        "accepted": sampled.accepted,
                    },
                }
    return out


def _export_decodes(export: Path) -> dict:
    from model.hf import encode_prompt, load_export

    model, tokenizer = load_export(export)
    return _decodes(model, tokenizer, [encode_prompt(tokenizer, prompt) for prompt in PROMPTS])


class _IdsOnly:
    """A tokenizer for a model without one: decodes ids to their numbers."""

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def _random_model_decodes() -> dict:
    """Decodes of a randomly initialised export-side model, whose varied logits exercise every
    acceptance length (a model trained a few steps drafts its one favourite token)."""
    from tests.factories import tiny_nld_model

    model = tiny_nld_model(seed=0)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 64, (1, n), generator=generator) for n in (3, 9)]
    return _decodes(model, _IdsOnly(), prompts)


def make_record(data: Path, work: Path) -> dict:
    record: dict = {"configs": composed_configs(), "runs": {}}
    os.environ["TANDEM_DATA"] = str(data)
    for name, overrides in VARIANTS.items():
        trained = _train(name, overrides, work)
        run = {"rows": trained["rows"], "step": trained["step"]}
        if name == "joint":
            export, run["export"] = _export(trained["checkpoints"], work)
            run["decode"] = _export_decodes(export)
        record["runs"][name] = run
    record["random_model_decode"] = _random_model_decodes()
    return record


# ---- comparison ------------------------------------------------------------------------------------


def _close(a, b, rel: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            return False
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def differences(expected, got, rel: float = 1e-5, path: str = "") -> list[str]:
    """Where ``got`` departs from ``expected``: floats beyond ``rel``, anything else not equal."""
    if isinstance(expected, dict) and isinstance(got, dict):
        found = []
        for key in sorted(set(expected) | set(got)):
            where = f"{path}/{key}"
            if key not in got:
                found.append(f"{where}: missing")
            elif key not in expected:
                found.append(f"{where}: not in the record")
            else:
                found += differences(expected[key], got[key], rel, where)
        return found
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(got)} items, the record has {len(expected)}"]
        found = []
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            found += differences(e, g, rel, f"{path}[{i}]")
        return found
    return [] if _close(expected, got, rel) else [f"{path}: {got!r}, the record has {expected!r}"]


def _without_removed(record: dict) -> dict:
    """The record without the config keys the refactor removed as dead."""
    record = json.loads(json.dumps(record))
    for config in record.get("configs", {}).values():
        for key in REMOVED_KEYS:
            config.pop(key, None)
    return record


def _without_added(record: dict) -> dict:
    """The record without what the refactor added to the export."""
    record = json.loads(json.dumps(record))
    export = record.get("runs", {}).get("joint", {}).get("export")
    if export is not None:
        for key in ADDED_CONFIG_JSON_KEYS:
            export["config"].pop(key, None)
        export["files"] = [name for name in export["files"] if name not in ADDED_EXPORT_FILES]
    return record


def compare(expected: dict, got: dict, rel: float = 1e-5) -> list[str]:
    return differences(_without_removed(expected), _without_added(got), rel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a prepared demo-data folder (needed unless --configs-only)")
    parser.add_argument("--configs-only", action="store_true", help="record the composed configs only")
    parser.add_argument("--out", help="write the record here")
    parser.add_argument("--compare", help="compare with this record; exit 1 on a difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same reduction order whatever the machine's core count
    if args.configs_only:
        record = {"configs": composed_configs()}
    elif args.data is None:
        parser.error("--data is needed unless --configs-only")
    else:
        with tempfile.TemporaryDirectory() as work:
            record = make_record(Path(args.data), Path(work))
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    if args.compare:
        expected = _without_removed(json.loads(Path(args.compare).read_text()))
        expected = {key: expected[key] for key in record}
        got = _without_added(json.loads(text))
        found = differences(expected, got)
        if not found:
            same = differences(expected, got, rel=0.0) == []
            print("identical to the record" + ("" if same else " within rel 1e-5 (not bit for bit)"))
        for line in found[:50]:
            print("  " + line)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
