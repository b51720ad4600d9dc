"""Shared helpers for the pipeline tests: run the repository's scripts as a user would."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the triton backend's kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when models.triton is imported

REPO = Path(__file__).resolve().parents[1]

XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:  # workers share the cores: one thread each, their subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    """A test that sets torch's threads (a benchmark's --threads) leaves the next one its own worker's: a run
    repeated in a subprocess then reduces its sums in the same order as in the worker."""
    yield
    if XDIST_WORKER and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# A tiny synthetic run: 16 train / 8 val images of 16x16, T=2, batch 8 (two steps per epoch).
TINY_ARGS = [
    "--dataset",
    "synthetic",
    "--arch",
    "dl-vgg9",
    "--img_size",
    "16",
    "--timesteps",
    "2",
    "--num_train",
    "16",
    "--num_val",
    "8",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--optimizer",
    "adam",
    "--lr",
    "1e-3",
    "--seed",
    "3",
    "--device",
    "cpu",
]


def _default_signals(then=None):
    """For a child: SIGINT and SIGTERM act as in a terminal, whatever the test run inherited (a suite
    started in the background or under nohup ignores SIGINT, and an ignored SIGINT stays ignored in the
    scripts, as it should for such a job); then `then`, the caller's own preexec_fn."""

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if then is not None:
            then()

    return setup


def start_script(*args, cwd=REPO, preexec_fn=None, **popen_kwargs) -> subprocess.Popen:
    """Start `python <args>` from the repository root, its output piped, with default signal handling."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    # A session of its own, so that a timeout also ends the children (torchrun's workers).
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_signals(preexec_fn),
        **popen_kwargs,
    )


def run_script(*args, check=True, timeout=240, cwd=REPO, **popen_kwargs):
    """Run `python <args>` from the repository root; returns the CompletedProcess."""
    popen = start_script(*args, cwd=cwd, **popen_kwargs)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def load_test_script():
    # test.py is loaded by path: `import test` could find the standard library's test package.
    spec = importlib.util.spec_from_file_location("test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(capsys, main, argv, *expected):
    """main(argv) through run_main fails with exit code 2 and one `error:` line holding each of `expected`."""
    from common.cli import run_main

    code = run_main(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_ann_run(tmp_path_factory):
    """One trained tiny ANN run (2 epochs); returns its run directory."""
    model_dir = tmp_path_factory.mktemp("runs")
    run_script(
        "train.py", *TINY_ARGS, "--model_type", "ann", "--epochs", "2", "--model_dir", model_dir, "--name", "ann"
    )
    return model_dir / "ann"
