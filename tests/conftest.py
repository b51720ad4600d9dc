"""Shared helpers for the pipeline tests: run the repository's scripts as a user would."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the triton backend's kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when models.lif_triton is imported

REPO = Path(__file__).resolve().parents[1]

# A tiny synthetic run: 16 train / 8 val images of 16x16, T=2, batch 8 (two steps per epoch).
TINY_ARGS = ["--dataset", "synthetic", "--arch", "dl-vgg9", "--img_size", "16", "--timesteps", "2",
             "--num_train", "16", "--num_val", "8", "--batch_size", "8", "--num_workers", "0",
             "--optimizer", "adam", "--lr", "1e-3", "--seed", "3", "--device", "cpu"]


def run_script(*args, check=True, timeout=240, cwd=REPO):
    """Run `python <args>` from the repository root; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    # A session of its own, so that a timeout also ends the children (torchrun's workers).
    popen = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
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


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_ann_run(tmp_path_factory):
    """One trained tiny ANN run (2 epochs); returns its run directory."""
    model_dir = tmp_path_factory.mktemp("runs")
    run_script("train.py", *TINY_ARGS, "--model_type", "ann", "--epochs", "2", "--model_dir", model_dir,
               "--name", "ann")
    return model_dir / "ann"
