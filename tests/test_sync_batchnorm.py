import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoseg.engine.distributed import CrossProcessBatchNorm2d, convert_sync_batchnorm


def _worker(rank, port, x, grad, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = CrossProcessBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xi = x[rank * 2 : rank * 2 + 2].clone().requires_grad_(True)
    y = bn(xi)
    (y * grad[rank * 2 : rank * 2 + 2]).sum().backward()
    out[rank] = {"y": y.detach(), "gx": xi.grad, "gw": bn.weight.grad, "mean": bn.running_mean.clone(),
                 "var": bn.running_var.clone()}
    dist.destroy_process_group()


def test_cross_process_batchnorm_equals_batchnorm_on_the_global_batch():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    grad = torch.randn(4, 3, 5, 6)
    manager = mp.Manager()
    out = manager.dict()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, x, grad, out), nprocs=2, join=True)

    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * grad).sum().backward()
    for rank in range(2):
        torch.testing.assert_close(out[rank]["y"], y[rank * 2 : rank * 2 + 2].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[rank]["gx"], xr.grad[rank * 2 : rank * 2 + 2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[rank]["mean"], ref.running_mean)
        torch.testing.assert_close(out[rank]["var"], ref.running_var)
    # Each process holds the gradient of its own half; DDP sums them: together they equal the global gradient.
    torch.testing.assert_close(out[0]["gw"] + out[1]["gw"], ref.weight.grad, atol=1e-4, rtol=1e-5)


def test_conversion_keeps_state_dict_keys():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CrossProcessBatchNorm2d) and list(converted.state_dict()) == keys
    # Without a process group it is a plain BatchNorm2d.
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), torch.nn.Sequential(model[0], torch.nn.BatchNorm2d(4))(x))
