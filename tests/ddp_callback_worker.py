"""One rank of `test_callbacks.test_distributed_data_parallel_*`: DDP over gloo, then a log.

Run as `python ddp_callback_worker.py RANK WORLD_SIZE STORE_FILE RESULT_FILE SETTINGS_JSON`, the
settings being the callback's `sar_weight` and `warmup_epochs` and the training state's `step`,
`max_steps` and `epochs`. Each rank trains one step on its own images, so the ranks' entropies
differ; it writes its own entropy and what the callback logged as JSON.
"""

import datetime
import json
import os
import sys

import torch
from tiny import TINY
from transformers import TrainerControl, TrainerState, TrainingArguments

from sar_hf import SARCallback, SARViTConfig, SARViTForImageClassification


def main(rank: int, world_size: int, store_file: str, result_file: str, settings: dict):
    store = torch.distributed.FileStore(store_file, world_size)
    # A short timeout: a rank whose peer died fails in a minute instead of gloo's default 30.
    timeout = datetime.timedelta(seconds=60)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    torch.manual_seed(0)  # the same weights on every rank, as DDP expects
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=settings["sar_weight"])).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    args = TrainingArguments(output_dir=os.path.dirname(result_file), report_to="none", use_cpu=True)
    state = TrainerState()
    state.global_step, state.max_steps = settings["step"], settings["max_steps"]
    state.num_train_epochs = settings["epochs"]

    callback = SARCallback(warmup_epochs=settings["warmup_epochs"], granularity="epoch")
    callback.on_train_begin(args, state, TrainerControl(), model=ddp)
    callback.on_step_begin(args, state, TrainerControl(), model=ddp)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    out = ddp(images, labels=torch.tensor([0, 1]))
    out.loss.backward()
    logs = {"loss": out.loss.item()}
    state.log_history.append(dict(logs))
    callback.on_log(args, state, TrainerControl(), logs=logs, model=ddp)
    result = {
        "entropy": out.spatial_entropy.item(),
        "scheduled_sar_weight": model.sar_loss.scheduled_sar_weight,
        "logs": logs,
        "last_history_entry": state.log_history[-1],
    }
    with open(result_file, "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    # Leave without running destructors: tearing down DDP's reducer and its gloo group while the
    # gloo thread still releases finished work can deadlock on the GIL (seen with torch 2.13).
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
