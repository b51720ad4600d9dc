"""How the C heap (glibc malloc) treats the large CPU tensors freed and reallocated at every step.

PyTorch's CPU tensors come from malloc. glibc's default maps each block over 32 MB fresh from the
kernel and unmaps it on free (so every step faults those pages in again), and serves smaller blocks
from a heap that it can only shrink from the top, so freed 8-32 MB blocks stay resident between live
ones. The policies (``--cpu_malloc``; their measured cost in time and memory: docs/performance.md):

- ``balanced``: map every block over 8 MB on its own (``M_MMAP_THRESHOLD``, which also stops glibc
  from raising that threshold as blocks are freed): freed large blocks go back to the kernel.
- ``default``: glibc as it is.
- ``keep``: serve every block from the heap and never hand freed memory back (``M_MMAP_MAX = 0``,
  trim threshold at its maximum): the fastest steps, the most memory.
- ``release``: map every block over 1 MB on its own: the least memory, the slowest steps.
- ``auto`` (the default): ``release`` in memory-saving mode, whose user has chosen memory over time,
  else ``balanced``; glibc's default where the C library has no mallopt.

mallopt is process-wide (the heap is the process's) and only exists in glibc; elsewhere a policy other
than ``default`` and ``auto`` is refused with an error rather than ignored. Python has no binding for
it, hence ctypes.
"""

import ctypes
import ctypes.util

POLICIES = ("auto", "balanced", "default", "keep", "release")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1

_SETTINGS = {
    "default": [],
    "balanced": [(_M_MMAP_THRESHOLD, 8 << 20)],
    "keep": [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)],
    "release": [(_M_MMAP_THRESHOLD, 1 << 20)],
}


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def resolve_cpu_malloc(policy: str, memory_saving: bool = False) -> str:
    """The concrete policy ``policy`` stands for ('auto' depends on ``memory_saving``)."""
    if policy not in POLICIES:
        raise ValueError(f"cpu_malloc must be one of {list(POLICIES)}, got '{policy}'")
    if policy == "auto":
        return "release" if memory_saving else "balanced"
    return policy


def set_cpu_malloc(policy: str, memory_saving: bool = False) -> str:
    """Apply one of ``POLICIES`` to this process's C heap (call it before the first training step);
    returns the concrete policy applied."""
    requested, policy = policy, resolve_cpu_malloc(policy, memory_saving)
    settings = _SETTINGS[policy]
    if not settings:
        return policy
    libc = _libc()
    if libc is None and requested == "auto":
        return "default"  # best effort: nothing to tune outside glibc
    if libc is None:
        raise RuntimeError(
            f"cpu_malloc '{policy}' needs glibc's mallopt, which this C library lacks; use cpu_malloc: default"
        )
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"cpu_malloc '{policy}': mallopt({param}, {value}) was refused by the C library")
    return policy
