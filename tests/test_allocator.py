"""The C heap policies of utils/allocator.py, observed through glibc's own accounting (mallinfo2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.allocator import set_cpu_malloc

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter (mallopt is process-wide). hblkhd = bytes in blocks mapped on their own.
PROBE = r"""
import ctypes, json, sys
import torch
from utils.allocator import set_cpu_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                 'keepcost')]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
set_cpu_malloc(sys.argv[1], memory_saving=sys.argv[2] == 'memory_saving')
before = libc.mallinfo2().hblkhd
mapped = lambda: libc.mallinfo2().hblkhd - before
big = torch.ones(4 * 2**20)       # 16 MB: by default glibc maps a block this large on its own
big_mapped = mapped()
del big                           # by default, freeing it raises glibc's threshold for mapping to 16 MB
small = torch.ones(2**19)         # 2 MB
small_mapped = mapped()
medium = torch.ones(10 * 2**18)   # 10 MB
print(json.dumps({'big_mapped': big_mapped, 'small_mapped': small_mapped, 'medium_mapped': mapped() - small_mapped}))
"""


def probe(policy, mode="normal"):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, policy, mode], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def glibc():
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="mallinfo2 is glibc-only")
def test_policies_change_how_glibc_places_blocks():
    mb = 2**20
    default, keep, release, balanced = probe("default"), probe("keep"), probe("release"), probe("balanced")
    assert default["big_mapped"] >= 16 * mb and default["small_mapped"] < 2 * mb
    assert default["medium_mapped"] < mb  # after the 16 MB free, glibc's default keeps 10 MB in its heap
    assert keep["big_mapped"] < mb  # served from the heap, kept after free: no new page faults next time
    assert release["small_mapped"] >= 2 * mb  # mapped (so freed back to the kernel) despite the 16 MB free
    # balanced: over 8 MB mapped (and returned at free) whatever was freed before; smaller from the heap
    assert balanced["medium_mapped"] >= 10 * mb and balanced["small_mapped"] < 2 * mb
    # auto: release in memory-saving mode, balanced otherwise
    assert probe("auto", "memory_saving")["small_mapped"] >= 2 * mb
    auto = probe("auto")
    assert auto["medium_mapped"] >= 10 * mb and auto["small_mapped"] < 2 * mb


def test_unknown_policy_is_refused_with_the_choices():
    choices = r"\['auto', 'balanced', 'default', 'keep', 'release'\]"
    with pytest.raises(ValueError, match=rf"cpu_malloc must be one of {choices}, got 'fast'"):
        set_cpu_malloc("fast")


def test_without_mallopt_auto_falls_back_and_explicit_policies_are_refused(monkeypatch):
    import utils.allocator as allocator

    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.set_cpu_malloc("auto") == "default"
    with pytest.raises(RuntimeError, match="cpu_malloc 'balanced' needs glibc's mallopt"):
        allocator.set_cpu_malloc("balanced")
