"""The process group a training run lives in: join the one the DeepSpeed launcher described, or make a
one-process group; and leave it cleanly."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cpu_threads: int | None = None) -> DistInfo:
    """Join the process group the DeepSpeed launcher described in the environment, or make a one-process group
    (gloo on CPU, nccl on GPU: DeepSpeed's accelerator picks)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Processes on one host share its cores; oversubscribing them slows every rank down.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    deepspeed.init_distributed(verbose=False)
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=local_rank, local_world_size=local_world, device=device)


def teardown_distributed() -> None:
    """Leave the process group after a last barrier, so no rank's communication threads are still running when
    the interpreter exits (their destructors abort a process: "terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm

        try:
            torch.distributed.barrier()
        finally:
            # DeepSpeed's, so that its cached groups go too and a later run in this process starts afresh.
            deepspeed.comm.destroy_process_group()


def barrier() -> None:
    torch.distributed.barrier()
