"""benchmarks/bench.py end to end on tiny models, its launch counter, and its per-timestep baseline."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from benchmarks import bench
from benchmarks.baseline import per_timestep_forward
from benchmarks.bench import count_cuda_work, main, parse_args, profile_events
from models import build_model

TINY = [
    "--timesteps",
    "2",
    "--batch_size",
    "1",
    "--img_size",
    "16",
    "--steps",
    "1",
    "--eval_batches",
    "1",
    "--threads",
    "2",
]
CUDA_FIELDS = (
    "cuda_launches_per_step",
    "cuda_kernels_per_step",
    "cuda_memops_per_step",
    "peak_cuda_mb",
    "eval_peak_cuda_mb",
)


def run_bench(argv, capsys):
    """The bench's last printed line, which must be one JSON object."""
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_reports_the_figures_it_promises(capsys):
    result = run_bench(TINY, capsys)
    for key in (
        "step_s",
        "solo_step_s",
        "bound_step_s",
        "eval_img_per_s",
        "import_rss_mb",
        "peak_rss_mb",
        "floor_peak_rss_mb",
    ):
        assert result[key] > 0, key
    assert result["path"] == "multistep" and result["timesteps"] == 2 and result["img_size"] == [16, 16]
    assert result["import_rss_mb"] <= result["framework_rss_mb"] <= result["peak_rss_mb"] <= result["floor_peak_rss_mb"]
    assert result["step_over_bound"] == pytest.approx(result["step_s"] / result["bound_step_s"], abs=2e-3)
    assert all(result[key] is None for key in CUDA_FIELDS)  # CPU: nothing to count


def test_bench_trains_the_per_timestep_path(capsys):
    result = run_bench(TINY + ["--path", "per-timestep", "--no_floor"], capsys)
    assert result["path"] == "per-timestep" and result["solo_step_s"] > 0 and result["eval_img_per_s"] > 0
    assert result["cuda_launches_per_step"] is None


def test_bench_baseline_and_backend_flags(capsys):
    result = run_bench(TINY + ["--baseline", "--no_floor", "--neuron_backend", "torch"], capsys)
    assert result["baseline"] and result["baseline_step_s"] > 0 and result["baseline_eval_img_per_s"] > 0
    assert result["speedup_vs_baseline"] == pytest.approx(result["baseline_step_s"] / result["solo_step_s"], abs=2e-3)
    assert result["eval_speedup_vs_baseline"] == pytest.approx(
        result["eval_img_per_s"] / result["baseline_eval_img_per_s"], rel=2e-3
    )
    assert result["neuron_backend"] == "torch" and result["neuron_backend_requested"] == "torch"
    assert result["baseline_cuda_launches_per_step"] is None and "bound_step_s" not in result


def test_ddd17_preset_scaled_down_feeds_two_channel_events(capsys):
    result = run_bench(
        [
            "--shape",
            "ddd17",
            "--timesteps",
            "2",
            "--batch_size",
            "1",
            "--img_size",
            "12",
            "20",
            "--steps",
            "1",
            "--eval_batches",
            "1",
            "--no_floor",
            "--threads",
            "2",
        ],
        capsys,
    )
    assert (result["shape"], result["input"], result["in_channels"], result["num_classes"]) == ("ddd17", "events", 2, 6)
    assert result["img_size"] == [12, 20] and result["solo_step_s"] > 0


def test_shape_presets_and_overrides():
    ddd17 = parse_args(["--shape", "ddd17"])
    assert (ddd17.timesteps, ddd17.batch_size, ddd17.img_size, ddd17.in_channels) == (20, 8, [200, 346], 2)
    voc64 = parse_args(["--shape", "voc64", "--batch_size", "2"])
    assert (voc64.timesteps, voc64.batch_size, voc64.img_size, voc64.num_classes) == (20, 2, [64, 64], 21)
    default = parse_args([])
    assert (default.timesteps, default.batch_size, default.img_size) == (10, 4, [64, 64])
    assert parse_args([]).neuron_backend is None  # left out of the model config unless given
    with pytest.raises(SystemExit):
        parse_args(["--img_size", "1", "2", "3"])


def test_dilated_as_dense_reaches_the_model_config_only_when_given():
    assert "dilated_as_dense" not in bench.model_config(parse_args([]), "snn")
    cfg = bench.model_config(parse_args(["--dilated_as_dense", "on"]), "snn")
    assert cfg["dilated_as_dense"] == "on"
    model = build_model(cfg)
    assert {unit.conv.dense for unit in model.conv_units()} == {"on"}


def test_counter_on_a_real_cpu_profile_sees_the_ops_and_no_gpu_work():
    a = torch.randn(8, 8)

    def three_products():
        b = a
        for _ in range(3):
            b = b @ a
        return b

    events = profile_events(three_products, torch.device("cpu"))
    assert sum(e.name == "aten::mm" for e in events) == 3  # the profile holds exactly the ops run
    assert count_cuda_work(events) == {"launches": 0, "kernels": 0, "memops": 0}


def _event(name, device, kind=None):
    return SimpleNamespace(name=name, device_type=device, activity_type=kind)


CPU, GPU = DeviceType.CPU, DeviceType.CUDA


@pytest.mark.parametrize("with_kind", [True, False])  # kineto's activity types, or names only (older torch)
def test_counter_on_a_synthetic_cuda_profile(with_kind):
    kinds = {"kernel": "kernel", "Memcpy": "gpu_memcpy", "Memset": "gpu_memset", "Sync": "cuda_sync"}

    def gpu(name, kind):
        return _event(name, GPU, kinds[kind] if with_kind else None)

    events = [
        _event("aten::add", CPU, "cpu_op"),
        _event("cudaLaunchKernel", CPU, "cuda_runtime"),
        gpu("void at::native::vectorized_elementwise_kernel<4>", "kernel"),
        _event("cuLaunchKernel", CPU, "cuda_driver"),
        gpu("triton_poi_fused_add_0", "kernel"),  # Triton
        _event("cudaLaunchKernelExC_v11060", CPU, "cuda_runtime"),
        gpu("sm90_xmma_gemm", "kernel"),
        _event("cudaMemcpyAsync", CPU, "cuda_runtime"),
        gpu("Memcpy DtoD (Device -> Device)", "Memcpy"),
        _event("cudaMemsetAsync", CPU, "cuda_runtime"),
        gpu("Memset (Device)", "Memset"),
        _event("cudaStreamSynchronize", CPU, "cuda_runtime"),
        gpu("Stream Sync", "Sync"),
        _event("cudaGraphLaunch", CPU, "cuda_runtime"),  # one launch, two kernels
        gpu("graph kernel a", "kernel"),
        gpu("graph kernel b", "kernel"),
        _event("cudaFuncGetAttributes", CPU, "cuda_runtime"),
        _event("cudaLaunchHostFunc", CPU, "cuda_runtime"),
    ]
    assert count_cuda_work(events) == {"launches": 4, "kernels": 5, "memops": 2}


def test_top_kernels_rank_kernels_by_summed_device_time():
    def kernel(name, micros, kind="kernel"):
        return SimpleNamespace(
            name=name, device_type=GPU, activity_type=kind, time_range=SimpleNamespace(elapsed_us=lambda: micros)
        )

    events = [
        kernel("conv", 300.0),
        kernel("lif_forward", 120.0),
        kernel("conv", 250.0),  # two calls: 550 us in all, the first
        kernel("Memcpy HtoD", 900.0, "gpu_memcpy"),  # not a kernel
        _event("cudaLaunchKernel", CPU, "cuda_runtime"),
        kernel("bn_reduce", 200.0),
        kernel("tiny", 1.0),
    ]
    assert bench.top_kernels(events, count=3) == [
        {"name": "conv", "calls": 2, "device_ms": 0.55},
        {"name": "bn_reduce", "calls": 1, "device_ms": 0.2},
        {"name": "lif_forward", "calls": 1, "device_ms": 0.12},
    ]
    assert bench.top_kernels([]) == [] and bench.TOP_KERNELS == 15


@pytest.mark.parametrize(
    "arch, cfg", [("dl-vgg9", {}), ("dl-vgg9", {"leaky": True, "full_prop": True}), ("fcn-vgg9", {"readout": "sum"})]
)
def test_baseline_equals_the_multistep_network(arch, cfg):
    """Same parameters, same input, float64: the same loss, logits and gradients (and so an independent
    check of the baseline the benchmark times against)."""
    torch.manual_seed(5)
    model = (
        build_model(dict(arch=arch, timesteps=2, num_classes=4, encoder="direct", def_threshold=0.5, **cfg))
        .double()
        .train()
    )
    images = torch.rand(1, 3, 10, 9, dtype=torch.float64) - 0.5
    labels = torch.randint(0, 4, (1, 10, 9))
    params = list(model.parameters())
    results = []
    for forward in (model, lambda x: per_timestep_forward(model, x)):
        logits = forward(images)
        loss = F.cross_entropy(logits, labels)
        results.append((logits, loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (fast, fast_loss, fast_grads), (slow, slow_loss, slow_grads) = results
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_loss, slow_loss)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b)
    first = next(i for i, p in enumerate(params) if p is model.conv_units()[0].conv.weight)
    assert fast_grads[first].abs().sum() > 0  # the gradient crossed every spiking layer


def test_gpu_suite_script_parses_and_sums_up(tmp_path):
    """The suite's shell (no row selected, so no benchmark runs): off CUDA the correctness check is
    reported as skipped, then one summary line; both lines, and only they, are in $OUT/gpu_suite.jsonl."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "SUITE_ONLY": "^no such row$", "PYTHON": sys.executable}
    env["SUITE_DEVICE"] = "cpu"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    check, summary = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    assert check["row"] == "correctness" and "not a CUDA device" in check["skipped"]
    assert summary["row"] == "summary" and summary["rows"] == 0 and summary["correct"] is None
    assert summary["budget_s"] == 540  # correctness and rows together fit a 10-minute call
    written = [json.loads(line) for line in (tmp_path / "gpu_suite.jsonl").read_text().splitlines()]
    assert written == [check, summary] and [p.name for p in tmp_path.iterdir()] == ["gpu_suite.jsonl"]


def test_gpu_suite_finds_python3_where_there_is_no_python(tmp_path):
    """Images that ship only `python3`: without PYTHON set and no `python` on PATH the suite uses python3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    assert subprocess.run(["bash", "-c", "command -v python"], env={"PATH": path}).returncode != 0
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "SUITE_ONLY": "^none$", "SUITE_DEVICE": "cpu"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["row"] == "summary"


def test_gpu_suite_rows_are_distinct():
    """Each bench configuration appears once (the default backend on CUDA is triton: no separate triton row)."""
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh").read_text()
    rows = [line.split(None, 3) for line in script.splitlines() if line.startswith("row ")]
    names = [r[1] for r in rows]
    flags = [r[3] if len(r) > 3 else "" for r in rows]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    assert "voc64-fp32-triton" not in names and "voc64-fp32" in names and "voc64-fp32-torch" in names
    assert script.index("tests/test_gpu_backends.py") < script.index("row voc64-fp32 ")  # correctness first
