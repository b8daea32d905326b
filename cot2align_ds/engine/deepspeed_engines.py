"""The one place that touches DeepSpeed: process group, the two engines, ZeRO-3 loading, saving.

* Student: ``deepspeed.initialize`` training engine over a module that holds the student model
  and the trainable projectors, with a client AdamW (param groups carry their own learning
  rates) and a client LR scheduler; ZeRO stage and offload come from the JSON.
* Teacher: a separate inference-only ZeRO-3 engine (no optimizer), parameters offloaded to CPU
  by default, whose weights are loaded straight into partitions through ``HfDeepSpeedConfig``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import resource
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors.torch import save
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from cot2align_ds.atomic import write_bytes_atomic
from cot2align_ds.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What ``_set_single_process_rendezvous`` sets: a process started by one that already trained
# must drop these from its environment, or it would try to join that process's group.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _set_single_process_rendezvous() -> None:
    """Without a launcher DeepSpeed falls back to MPI discovery; a 1-rank group needs none."""
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun names it differently
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])


def shm_workspace_path(rank: int | None = None) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps this rank's workspace (~70 MB)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank
    )
    return Path("/dev/shm") / name


def _unlink_shm_workspace() -> None:
    """Drop the name of this rank's shm workspace once every rank has mapped the others'.

    DeepSpeed creates it at init and never unlinks it, so without this each run on CPU leaves
    ~70 MB of RAM behind in /dev/shm (hundreds of runs fill a machine's memory). The mapping stays valid
    after the unlink; the memory is freed when the process exits, however it exits.
    """
    # DeepSpeed uses the shm path exactly when every rank is local (LOCAL_SIZE == world size); the
    # same condition on every rank keeps the barrier collective.
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    barrier()  # the other ranks open our workspace by name during their init
    shm_workspace_path(dist.get_rank()).unlink(missing_ok=True)


def init_distributed(timeout_s: int = 1800) -> DistContext:
    """Join (or create) the process group; idempotent. Refuses a GPU job that cannot use its
    GPUs; binds this rank to its GPU before the first collective."""
    require_usable_gpus(os.environ, get_accelerator().device_name())
    _set_single_process_rendezvous()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_name = get_accelerator().device_name()
    device = torch.device(device_name, local_rank) if device_name != "cpu" else torch.device("cpu")
    if device.type != "cpu":
        # Before the process group: NCCL's first collective otherwise creates its communicator
        # on GPU 0 for every rank of the node.
        get_accelerator().set_device(local_rank)
    if not dist.is_initialized():
        backend = get_accelerator().communication_backend_name()
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
        _unlink_shm_workspace()
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


class NoUsableGpuError(UserError):
    """The scheduler gave this job GPUs, but this torch cannot use them."""


# Set by SLURM when a job or step holds GPUs (whichever of --gpus*, --gres=gpu requested them).
_GPU_JOB_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def require_usable_gpus(env: dict[str, str] | os._Environ, device_name: str) -> None:
    """A job given GPUs must run on them: DeepSpeed would otherwise fall back to its CPU
    accelerator and gloo with one warning, and train for days on the CPU."""
    granted = next((key for key in _GPU_JOB_VARIABLES if env.get(key, "") not in ("", "0")), None)
    if granted is None or device_name != "cpu":
        return
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        reason = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver?)"
    raise NoUsableGpuError(
        f"this job was given GPUs ({granted}={env[granted]}) but {reason}; install a CUDA "
        "build of torch in this environment on a GPU node (not a login node), or submit "
        "without GPUs"
    )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """While active, ``from_pretrained``/``from_config`` build models under ``zero.Init``.

    Parameters then land directly in their ZeRO-3 partitions instead of a full copy per rank.
    Only one such config can be active at a time (transformers keeps a global reference), so
    the teacher and the student are loaded one after the other.
    """
    is_zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    holder = HfDeepSpeedConfig(ds_config) if is_zero3 else None
    try:
        yield
    finally:
        del holder
        unset_hf_deepspeed_config()


class EngineDtypeError(UserError):
    """The module's weights are not all in the dtype the DeepSpeed config runs in."""


_DS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed keeps module weights in under ``ds_config``."""
    for section, dtype in _DS_DTYPES.items():
        if (ds_config.get(section) or {}).get("enabled"):
            return dtype
    return torch.float32


def require_run_dtype(module: torch.nn.Module, ds_config: dict[str, Any], role: str) -> None:
    """One line naming the stray weights, instead of DeepSpeed's bare assertion (ZeRO-3 flattens
    weights into one buffer per dtype) or a dtype mismatch at the first matmul."""
    wanted = run_dtype(ds_config)
    stray = [(n, p.dtype) for n, p in module.named_parameters() if p.dtype != wanted]
    if stray:
        name, dtype = stray[0]
        raise EngineDtypeError(
            f"{role}: {len(stray)} weight(s) are {str(dtype).removeprefix('torch.')} (first: "
            f"'{name}') but the run is {str(wanted).removeprefix('torch.')}; load or cast the "
            "model in train.precision (a checkpoint with mixed dtypes needs converting first)"
        )


def build_student_engine(
    module: torch.nn.Module,
    ds_config: dict[str, Any],
    param_groups: list[dict[str, Any]],
    lr_lambdas: list[Callable[[int], float]],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Any:
    require_run_dtype(module, ds_config, "student")
    optimizer = torch.optim.AdamW(param_groups, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


class NvmeOffloadError(UserError):
    """NVMe offload is configured but DeepSpeed cannot do asynchronous I/O here."""


def require_nvme_io(ds_config: dict[str, Any], role: str) -> None:
    """An NVMe-offloading config needs DeepSpeed's ``async_io`` op (libaio): say so at start-up,
    in one line, rather than as a build error after the models are loaded."""
    zero = ds_config.get("zero_optimization") or {}
    devices = [
        (zero.get(key) or {}).get("device") for key in ("offload_param", "offload_optimizer")
    ]
    if "nvme" not in devices:
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise NvmeOffloadError(
            f"deepspeed.{role}_config offloads to NVMe, but DeepSpeed's async_io op cannot be "
            "built here (install libaio-dev, then reinstall deepspeed; `ds_report` shows the "
            "op); or use an offload_cpu config"
        )


def build_teacher_engine(module: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    require_run_dtype(module, ds_config, "teacher")
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine


def gathered_state_dict(engine: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unpartitioned) weights of ``engine.module`` whose names start with ``prefix``.

    Gathers one submodule at a time so peak memory is one layer, not the model; every rank
    must call this (the gather is collective); only rank 0 keeps the tensors.
    """
    state: dict[str, torch.Tensor] = {}
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    persistent = set(engine.module.state_dict().keys())  # drops non-persistent buffers
    for module_name, submodule in engine.module.named_modules():
        own = list(submodule.named_parameters(recurse=False))
        own_buffers = list(submodule.named_buffers(recurse=False))
        if not own and not own_buffers:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if is_main:
                for name, tensor in own + own_buffers:
                    full_name = f"{module_name}.{name}" if module_name else name
                    if full_name.startswith(prefix) and full_name in persistent:
                        state[full_name[len(prefix) :]] = tensor.detach().cpu().clone()
    return state


def non_finite_parameters(engine: Any) -> tuple[int, list[str]]:
    """Collective: how many parameters hold a non-finite value on any rank, and the names of
    those this rank holds (its ZeRO-3 partitions, or the full tensors without partitioning)."""
    names = []
    for name, parameter in engine.module.named_parameters():
        local = getattr(parameter, "ds_tensor", parameter.data)
        if local.numel() and not bool(torch.isfinite(local).all()):
            names.append(name)
    count = all_reduce_sum(torch.tensor([float(len(names))], device=engine.device))
    return int(count.item()), names


def gathered_copy(parameter: torch.nn.Parameter) -> torch.Tensor:
    """A detached full copy of one (possibly ZeRO-3-partitioned) parameter, on every rank.

    A copy, because the gathered storage is released when the gather context closes while
    autograd may still hold the tensor for the backward pass.
    """
    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
        return parameter.detach().clone()


def save_checkpoint(engine: Any, root: Path, tag: str) -> None:
    """Collective: every rank writes its ZeRO partitions, optimizer and scheduler state."""
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)


def load_checkpoint(engine: Any, root: Path, tag: str) -> None:
    """Collective: restore weights, optimizer and scheduler exactly as saved."""
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in state.items()}
    write_bytes_atomic(path, save(tensors))


def engine_device(engine: Any) -> torch.device:
    return engine.device


def peak_memory_mb() -> dict[str, float]:
    """Peak accelerator memory (allocated by torch) and peak host RSS of this process, in MB."""
    peaks = {"mem/peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        peaks["mem/peak_device_mb"] = accelerator.max_memory_allocated() / 2**20
    return peaks


def global_grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
