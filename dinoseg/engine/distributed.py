"""One code path for 1 process and N processes launched by torchrun (env:// rendezvous)."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .optim import TrainingError


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def resolve_device(name: str | None) -> torch.device:
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(device_name: str | None = None) -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        visible = torch.cuda.device_count()
        if max(local_rank + 1, local_world) > visible:  # every process says so, before any waits for the others
            raise TrainingError(f"{max(local_rank + 1, local_world)} processes on this machine but {visible} GPU(s) "
                                f"visible: one process per GPU (torchrun --nproc_per_node={visible}), or device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not is_enabled():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return device


def cleanup() -> None:
    if is_enabled():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place when the tensor can travel as it is; NCCL only reduces CUDA tensors)."""
    if not is_enabled():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.cuda()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return tensor.copy_(moved)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    if not is_enabled():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def together():
    """A block that every process runs (set-up checks, say): if it fails on any process, it fails on all of them,
    with the first failure's message, instead of leaving the others waiting at the next collective call."""
    failure = None
    try:
        yield
    except Exception as e:  # re-raised below, on every process
        failure = e
    failures = all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
    if first is not None:
        raise TrainingError(f"process {first[0]} failed: {first[1]}")


class CrossProcessBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, for any backend (gloo on CPU too).

    `nn.SyncBatchNorm` refuses CPU modules under DDP; this computes the same thing with differentiable
    all-reduces of per-channel sums. Same parameters and buffers as BatchNorm2d, so state-dict keys are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_enabled() and get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)  # autograd-aware: gradients are summed back over processes
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch norms synchronised over processes: `nn.SyncBatchNorm` on CUDA, `CrossProcessBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = CrossProcessBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats, device=child.weight.device if child.affine else None)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
