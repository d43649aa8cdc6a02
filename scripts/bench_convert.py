"""Conversion benchmark: peak memory and time of the HF export and import, streaming against the
whole-model path, measured side by side in one run.

    python scripts/bench_convert.py [--small] [--layers 24 --hidden 1024 --ffn 2816 --heads 16
        --groups 8 --vocab 32000] [--repeats 1] [--work DIR] [--out bench_convert.json]

It saves a random model of that shape (default: about 0.35 B parameters) as a Tandem checkpoint (fp32,
TP=1), then runs each conversion in a fresh Python process:
- export to fp32 and to bf16: streaming (``train.convert.export_checkpoint``) and whole-model (the code path
  it replaced: an fp32 Megatron model loaded through ``load_megatron_state``, ``keymap.to_hf``, a cast,
  safetensors ``save_file``);
- import of each export: streaming (``train.convert.import_hf``) and whole-model (every tensor loaded,
  ``keymap.from_hf``, an fp32 Megatron model, ``load_state_dict``, ``checkpoint.save``).
Each process reports its own peak resident memory (Linux ``VmHWM``; its forked checkpoint writers
included); the peak of a process that only imports the same modules is subtracted, and the rest is
printed as a ratio to the weights' bytes (exports: the written weights; imports: the weights read).
The whole-model rows write weights only (no tokenizer or config): that part is small.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("export fp32", "export bf16", "import fp32", "import bf16")
PATHS = ("streaming", "whole-model")


def _imports() -> None:
    """Everything either path imports, so that the baseline process holds the same code."""
    import huggingface_hub  # noqa: F401
    import megatron.core  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import model.hf.keymap  # noqa: F401
    import train.convert  # noqa: F401


def whole_model_export(checkpoint: Path, out: Path, dtype: str) -> None:
    """The export before streaming: the whole fp32 model, its renamed state dict, cast, saved."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from model.hf import keymap
    from model.hf.config_json import HF_DTYPES, MODEL_TYPE
    from model.hf.safetensors_io import SHARD_SIZE
    from train.convert import find_checkpoint, load_megatron_state

    info = find_checkpoint(checkpoint)
    state = keymap.to_hf(load_megatron_state(info), info.model, keymap.LAYOUTS[MODEL_TYPE])
    state = {k: v.to(HF_DTYPES[dtype]) for k, v in state.items()}
    out.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})


def whole_model_import(hf_dir: Path, out: Path) -> None:
    """The import before streaming: every tensor in memory, converted, loaded into an fp32 model, saved."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from model.config import ParallelConfig, PrecisionConfig, TransformerImpl
    from model.hf import keymap
    from model.hf.config_json import MODEL_TYPE, model_from_hf
    from model.megatron import build_model
    from train import checkpoint as ckpt
    from train.config import TrainConfig
    from train.distributed import single_process

    model = model_from_hf(json.loads((hf_dir / "config.json").read_text()), name=hf_dir.name)
    source = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        source.update(load_file(str(path)))
    state = keymap.from_hf(source, model, keymap.LAYOUTS[MODEL_TYPE])
    train_cfg = OmegaConf.structured(TrainConfig)
    train_cfg.model = model
    with single_process():
        local = dataclasses.replace(model, transformer_impl=TransformerImpl.local)
        megatron = build_model(local, ParallelConfig(), PrecisionConfig())
        megatron.load_state_dict(state, strict=False)
        ckpt.save(out, [megatron], None, ckpt.TrainState(), OmegaConf.to_yaml(train_cfg))


def run_child(job: dict) -> dict:
    """Runs in the fresh process: one conversion (or none, for the baseline); its seconds and peak."""
    _imports()
    start = time.perf_counter()
    step, path = job.get("step"), job.get("path")
    if step is not None:
        from train.convert import export_checkpoint, import_hf

        kind, dtype = step.split()
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        source, out = Path(job["source"]), Path(job["out"])
        if kind == "export" and path == "streaming":
            export_checkpoint(source, out, dtype=dtype)
        elif kind == "export":
            whole_model_export(source, out, dtype)
        elif path == "streaming":
            import_hf(source, out)
        else:
            whole_model_import(source, out)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report at least the
    # resident size of the benchmark process that started it. The forked checkpoint writers (children
    # of this process, never exec'd) report through RUSAGE_CHILDREN.
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    writers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_bytes": max(hwm_kib, writers_kib) * 1024}


def measure(job: dict, work: Path) -> dict:
    """Run ``job`` in a fresh Python process; its result comes back in a file (libraries print to
    stdout)."""
    result = work / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job), "--result", str(result)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    if proc.returncode != 0:
        name = f"{job.get('step', 'baseline')} ({job.get('path', 'imports only')})"
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def save_random_checkpoint(args, root: Path) -> int:
    """A random model of the requested shape saved as a Tandem checkpoint; returns its parameters."""
    import torch
    from omegaconf import OmegaConf

    from data.tokenizer import train_tokenizer
    from model.config import ModelConfig, ParallelConfig, PrecisionConfig
    from model.megatron import build_model
    from train import checkpoint as ckpt
    from train.config import TrainConfig
    from train.distributed import single_process
    from train.objectives import ObjectiveConfig

    texts = [
        f"The benchmark model {i} reads and writes its weights one tensor at a time." for i in range(200)
    ]
    train_tokenizer(texts, root / "tokenizer", vocab_size=512)
    model_cfg = ModelConfig(
        name="bench-convert",
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model, cfg.objective = model_cfg, ObjectiveConfig(mask_token_id=2)
    torch.manual_seed(0)
    with single_process():
        model = build_model(model_cfg, ParallelConfig(), PrecisionConfig())
        ckpt.save(
            root / "ckpt",
            [model],
            None,
            ckpt.TrainState(),
            OmegaConf.to_yaml(cfg),
            tokenizer=root / "tokenizer",
        )
        return sum(p.numel() for p in model.parameters())


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    """Tensor-for-tensor equality of two exports, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        names = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                names.update(dict.fromkeys(f.keys(), path))
        return names

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                return False
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--small", action="store_true", help="a 2-layer, hidden-256 model: a quick run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each conversion (medians reported)")
    parser.add_argument("--work", help="folder for the checkpoint and outputs (default: a temporary one)")
    parser.add_argument("--out", default="bench_convert.json", help="JSON file for the figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.small:
        args.layers, args.hidden, args.ffn, args.heads, args.groups, args.vocab = 2, 256, 704, 4, 2, 4096
    from tqdm import tqdm

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_convert."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"saving a random {args.layers}-layer, hidden-{args.hidden} model under {work} ...", flush=True)
        parameters = save_random_checkpoint(args, work)
        jobs = []
        for step in STEPS:
            for path in PATHS:
                for repeat in range(args.repeats):
                    tag = f"{step.replace(' ', '_')}_{path}_{repeat}"
                    dtype = step.split()[1]
                    source = (
                        work / "ckpt" if step.startswith("export") else work / f"export_{dtype}_streaming_0"
                    )
                    jobs.append({"step": step, "path": path, "source": str(source), "out": str(work / tag)})
        baselines = []
        results: dict[tuple[str, str], list[dict]] = {}
        with tqdm(total=len(jobs) + args.repeats, desc="conversions", unit="run") as progress:
            for _ in range(args.repeats):
                progress.set_postfix_str("baseline (imports only)")
                baselines.append(measure({}, work)["peak_bytes"])
                progress.update()
            for job in jobs:
                progress.set_postfix_str(f"{job['step']}, {job['path']}")
                result = measure(job, work)
                out = Path(job["out"])
                exporting = job["step"].startswith("export")
                result["weights"] = weight_bytes(out if exporting else Path(job["source"]))
                if exporting and job["path"] == "whole-model":
                    streamed = work / f"export_{job['step'].split()[1]}_streaming_0"
                    result["same_weights_as_streaming"] = same_weights(streamed, out)
                results.setdefault((job["step"], job["path"]), []).append(result)
                if not job["out"].endswith("_streaming_0"):
                    shutil.rmtree(out)  # keep the disk small; the streaming exports are the import sources
                progress.update()
        baseline = statistics.median(baselines)
        rows = []
        for (step, path), runs in results.items():
            peak = statistics.median(r["peak_bytes"] for r in runs) - baseline
            rows.append(
                {
                    "step": step,
                    "path": path,
                    "weights_bytes": runs[0]["weights"],
                    "peak_above_baseline_bytes": peak,
                    "peak_ratio": peak / runs[0]["weights"],
                    "seconds": statistics.median(r["seconds"] for r in runs),
                    "same_weights_as_streaming": all(r.get("same_weights_as_streaming", True) for r in runs)
                    if path == "whole-model" and step.startswith("export")
                    else None,
                }
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(
        f"\nmodel: {parameters / 1e9:.3f} B parameters ({args.layers} layers, hidden {args.hidden}, ffn "
        f"{args.ffn}, {args.heads} heads, {args.groups} kv groups, vocab {args.vocab}); checkpoint fp32; "
        f"baseline (imports only) {baseline / gib:.2f} GiB; medians of {args.repeats} run(s)"
    )
    print(
        f"{'step':12s} {'path':12s} {'weights GiB':>11s} {'peak-base GiB':>13s} {'peak/weights':>12s} "
        f"{'seconds':>8s}  same weights"
    )
    for row in rows:
        same = {None: "", True: "yes", False: "NO"}[row["same_weights_as_streaming"]]
        print(
            f"{row['step']:12s} {row['path']:12s} {row['weights_bytes'] / gib:11.2f} "
            f"{row['peak_above_baseline_bytes'] / gib:13.2f} {row['peak_ratio']:12.2f} "
            f"{row['seconds']:8.1f}  {same}"
        )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "parameters": parameters,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "groups", "vocab")},
        "baseline_bytes": baseline,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
