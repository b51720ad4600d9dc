"""How the C heap (glibc malloc) treats the large CPU tensors freed and reallocated at every step.

PyTorch's CPU tensors come from malloc. By default glibc maps each block over 32 MB fresh from the
kernel and unmaps it on free, so a training step of spiking dl-vgg9 (T=10, batch 4, 64x64) touches
about a gigabyte of new pages per step: some 250,000 page faults, a quarter of its time on this
project's 2-core CPU. The policies (``--cpu_malloc``):

- ``default``: leave glibc as it is.
- ``keep``: serve every block from the heap and never hand freed memory back (``M_MMAP_MAX = 0``,
  trim threshold at its maximum): after the first step no page is faulted again. About 25 % faster
  steps, for a peak resident memory some 200 MB higher (README.md, Performance).
- ``release``: map every block over 1 MB separately so that freed memory goes back to the kernel at
  once (``M_MMAP_THRESHOLD = 1 MB``): the lowest peak memory, for about 50 % slower steps. With
  glibc's default, the heap keeps 150-350 MB more than the live tensors (freed blocks of 4-32 MB it
  cannot return), which grows over the first steps; ``release`` keeps it near 60 MB.
- ``auto`` (the default): ``release`` in memory-saving mode, whose user has chosen memory over time,
  else ``default``.

mallopt is process-wide and only exists in glibc; elsewhere a policy other than ``default`` is
refused with an error rather than ignored. Python has no binding for it, hence ctypes.
"""
import ctypes
import ctypes.util

POLICIES = ('auto', 'default', 'keep', 'release')

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1

_SETTINGS = {
    'default': [],
    'keep': [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)],
    'release': [(_M_MMAP_THRESHOLD, 1 << 20)],
}


def _libc():
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, 'mallopt') else None
    except OSError:
        return None


def resolve_cpu_malloc(policy: str, memory_saving: bool = False) -> str:
    """The concrete policy ``policy`` stands for ('auto' depends on ``memory_saving``)."""
    if policy not in POLICIES:
        raise ValueError(f"cpu_malloc must be one of {list(POLICIES)}, got '{policy}'")
    if policy == 'auto':
        return 'release' if memory_saving else 'default'
    return policy


def set_cpu_malloc(policy: str, memory_saving: bool = False) -> str:
    """Apply one of ``POLICIES`` to this process's C heap (call it before the first training step);
    returns the concrete policy applied."""
    policy = resolve_cpu_malloc(policy, memory_saving)
    settings = _SETTINGS[policy]
    if not settings:
        return policy
    libc = _libc()
    if libc is None:
        raise RuntimeError(f"cpu_malloc '{policy}' needs glibc's mallopt, which this C library lacks; "
                           "use cpu_malloc: default")
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"cpu_malloc '{policy}': mallopt({param}, {value}) was refused by the C library")
    return policy
