"""One rank of `test_capture.test_fully_sharded_models_*`: FSDP2 over gloo on the CPU.

Run as `python fsdp_worker.py RANK WORLD_SIZE STORE_FILE RESULT_FILE SETTINGS_JSON`, the settings
naming the model (`"sar-vit"` or `"deit"`). Each rank shards a copy of the same model with
`fully_shard` (every encoder layer, then the whole model), runs one training forward and backward
on its own images with the SAR term, and writes: its loss, the loss of an unsharded twin on the
same images, and the full gradient of the regularised layer's query projection (sharded: the
mean over ranks, gathered; unsharded: its own, to be averaged by the test).
"""

import datetime
import json
import os
import sys

import torch
from tiny import TINY
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import DeiTConfig, DeiTForImageClassification

from sar_hf import SARViTConfig, SARViTForImageClassification, SpatialEntropyLoss


def build(name: str):
    torch.manual_seed(0)  # the same weights on every rank
    if name == "sar-vit":
        model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=0.5))
        return model, model.vit.layers
    model = DeiTForImageClassification(DeiTConfig(**TINY))
    SpatialEntropyLoss(model, sar_weight=0.5)
    return model, model.deit.layers


def main(rank: int, world_size: int, store_file: str, result_file: str, settings: dict):
    store = torch.distributed.FileStore(store_file, world_size)
    timeout = datetime.timedelta(seconds=60)  # a rank whose peer died fails in a minute
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    generator = torch.Generator().manual_seed(rank)
    images, labels = torch.randn(2, 3, 16, 16, generator=generator), torch.randint(0, 3, (2,), generator=generator)

    result = {}
    for sharded in (False, True):
        model, layers = build(settings["model"])
        model.train()
        if sharded:
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        grad = model.sar_loss.capture.module.q_proj.weight.grad
        grad = grad.full_tensor() if sharded else grad  # FSDP2 keeps the mean over ranks, sharded
        key = "sharded" if sharded else "unsharded"
        result[key] = {"loss": loss.item(), "grad": grad.tolist(), "module": type(model).__name__}
    with open(result_file, "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    os._exit(0)  # no teardown of the gloo group (see ddp_callback_worker.py)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
