"""HyMUNet under DistributedDataParallel (CPU, gloo, 2 processes): no unused parameters, synchronised gradients."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_step(rank: int, world_size: int, port: int, result_dir: str) -> None:
    import os

    from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        net = hymunet_from_unet_kwargs(
            input_channels=2,
            n_stages=4,
            features_per_stage=[4, 8, 8, 8],
            conv_op=nn.Conv2d,
            kernel_sizes=[[3, 3]] * 4,
            strides=[[1, 1], [2, 2], [2, 2], [2, 2]],
            n_conv_per_stage=[2] * 4,
            num_classes=3,
            n_conv_per_stage_decoder=[2] * 3,
            conv_bias=True,
            norm_op=nn.InstanceNorm2d,
            norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True},
            deep_supervision=True,
            n_mamba_stages=2,
            scan="cross",
        )
        net.apply(net.initialize)
        ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
        x = torch.randn(2, 2, 32, 32, generator=generator)
        target = torch.randint(0, 3, (2, 32, 32), generator=generator)
        for _ in range(2):  # a second step fails if the first left a parameter without a gradient
            optimizer.zero_grad(set_to_none=True)
            outputs = ddp(x)
            targets = [target]
            for out in outputs[1:]:
                targets.append(nn.functional.interpolate(target[:, None].float(), size=out.shape[2:])[:, 0].long())
            loss = sum(nn.functional.cross_entropy(o, t) / 2**i for i, (o, t) in enumerate(zip(outputs, targets)))
            loss.backward()
            optimizer.step()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        torch.save(
            {"grads": grads, "loss": float(loss), "n_none": sum(p.grad is None for p in net.parameters())},
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: ~15 s on a quiet 2-core machine, more under load
def test_ddp_training_step_synchronises_gradients(tmp_path):
    world_size = 2
    mp.spawn(_train_step, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert all(r["n_none"] == 0 for r in results)
    assert results[0]["loss"] != results[1]["loss"]  # the ranks saw different data ...
    torch.testing.assert_close(results[0]["grads"], results[1]["grads"])  # ... and hold the all-reduced gradient
    assert results[0]["grads"].abs().sum() > 0
