"""The Triton kernels compile for a real GPU (sm_90, Hopper) without one: Triton's compiler and ptxas
run on the CPU. The interpreter (tests/test_lif_triton.py) checks what the kernels compute but not that
they compile: a type or layout error that only the compiler sees fails here.

The launches to compile are recorded from real calls of the backend (a few configurations), then each
kernel is compiled with the arguments' types, in a subprocess with the interpreter off and a fresh cache.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_with_exact_division_and_no_fma(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {
        "_bn_partials_kernel",
        "_bn_finish_kernel",
        "_lif_forward_kernel",
        "_lif_backward_kernel",
        "_bn_grad_kernel",
    }
    assert set(report["compiled"]) == kernels and not report["failed"]
    # Both resets (the constexpr HARD_RESET) of both LIF kernels.
    assert report["resets"] == {name: [False, True] for name in ("_lif_backward_kernel", "_lif_forward_kernel")}
    # Spikes compare a correctly rounded u / theta with 1, and leak * u + I rounds twice (as torch does).
    # The three forwards with a float32 membrane: float32 and bf16 x, both resets.
    assert report["forward_ptx"] == [{"div.rn.f32": True, "fma.rn.f32": False}] * 3


# ------------------------------------------------------------------- the subprocess (interpreter off)
def _record_launches(launch):
    """Replace each kernel by a recorder of (kernel, arguments), then drive the backend on CPU tensors."""
    import torch

    from models.surrogates import get_surrogate

    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    for name in (
        "_bn_partials_kernel",
        "_bn_finish_kernel",
        "_lif_forward_kernel",
        "_lif_backward_kernel",
        "_bn_grad_kernel",
    ):
        setattr(launch, name, Recorder(getattr(launch, name)))
    launch._INTERPRETED = True  # let the host code run on CPU tensors; nothing is launched

    def drive(dtype, theta, theta_neg, surrogate, hard_reset):
        steps, n, c, h, w = 3, 2, 8, 4, 4
        x = torch.randn(steps * n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
        x = x.view(steps, n, c, h, w)
        bn = types.SimpleNamespace(
            weight=torch.ones(2 * c),
            running_mean=torch.zeros(2 * c),
            running_var=torch.ones(2 * c),
            training=True,
            momentum=0.1,
            eps=1e-4,
            steps=2,
        )
        params = types.SimpleNamespace(
            leak=0.9, theta=theta, theta_neg=theta_neg, surrogate=get_surrogate(surrogate), hard_reset=hard_reset
        )
        u0 = torch.zeros(x[0].shape, dtype=torch.float32)
        spikes, compact, u, mean, invstd = launch.forward(x, u0, params, bn, True)
        launch.backward(x, u0, compact, mean, invstd, bn.weight, torch.ones_like(x), torch.zeros_like(u), params, bn)

    drive(torch.float32, 0.5, None, "linear", False)
    drive(torch.bfloat16, torch.rand(8, 1, 1) + 0.5, -0.7, "atan", False)
    drive(torch.float32, torch.rand(8, 4, 4) + 0.5, -0.7, "sigmoid", True)
    return calls


def _signature(kernel, args, kwargs):
    import torch

    types_of = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.int8: "i8"}
    signature, constants = {}, {}
    values = list(args) + [kwargs[name] for name in kernel.arg_names[len(args) :]]
    for name, value in zip(kernel.arg_names, values):
        if name in kwargs:
            signature[name], constants[name] = "constexpr", value
        elif torch.is_tensor(value):
            signature[name] = "*" + types_of[value.dtype]
        else:
            signature[name] = "i32" if isinstance(value, int) and abs(value) < 2**31 else "i64"
    return signature, constants


def _compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(REPO))
    from models.triton import launch

    compiled, failed, forward_ptx, resets = set(), [], [], {}
    for kernel, args, kwargs in _record_launches(launch):
        signature, constants = _signature(kernel, args, kwargs)
        options = {key: kwargs[key] for key in ("num_warps", "enable_fp_fusion") if key in kwargs}
        for key in options:
            signature.pop(key, None), constants.pop(key, None)
        try:
            binary = triton.compile(
                ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options
            )
        except Exception as error:  # reported, not raised: the test names every kernel that fails
            failed.append(f"{kernel.__name__}: {error!r}"[:2000])
            continue
        compiled.add(kernel.__name__)
        if "HARD_RESET" in constants:
            resets.setdefault(kernel.__name__, set()).add(constants["HARD_RESET"])
        if kernel.__name__ == "_lif_forward_kernel" and signature.get("u_ptr") == "*fp32":
            forward_ptx.append({op: op in binary.asm["ptx"] for op in ("div.rn.f32", "fma.rn.f32")})
    resets = {name: sorted(values) for name, values in resets.items()}
    print(json.dumps({"compiled": sorted(compiled), "failed": failed, "forward_ptx": forward_ptx, "resets": resets}))


if __name__ == "__main__":
    _compile_all()
