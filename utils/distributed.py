"""torch.distributed set-up from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK).

Launched as `torchrun --nproc_per_node=N train.py ...` (add --nnodes/--node_rank/--rdzv_endpoint for
several machines) every process calls `init_distributed`; a plain `python train.py` stays single-process.
"""

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto") -> dict:
    """Start the process group when launched by torchrun. Returns rank, world_size, local_rank, distributed."""
    if not launched_by_torchrun():
        return {"rank": 0, "world_size": 1, "local_rank": 0, "distributed": False}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank, "distributed": world_size > 1}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over all processes, on `tensor`'s device (`tensor` itself when
    single-process). nccl reduces only CUDA tensors and gloo only CPU ones, hence the round trip."""
    if not is_distributed():
        return tensor
    reduced = tensor.to(_reduce_device())
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all processes (identity when single-process)."""
    if not is_distributed():
        return list(values)
    return sum_over_processes(torch.tensor(values, dtype=torch.float64)).tolist()


def broadcast_buffers(model: torch.nn.Module):
    """Give every process rank 0's buffers (BN running statistics) so that evaluation is identical."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
