"""Which Trainer checkpoint folders are complete, so that a run killed while saving resumes from the last good one."""

import json
import logging
import os
import re
import zipfile

logger = logging.getLogger(__name__)

#: Trainer's checkpoint folders: `checkpoint-<global step>`.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
#: Weight files Trainer writes, one of which a complete checkpoint holds: whole, or an index of shards.
WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_complete_checkpoint(path: str) -> bool:
    """Whether Trainer finished writing the checkpoint folder `path`.

    Trainer writes the weights, then the optimizer, scheduler and RNG states, and
    `trainer_state.json` last; a run killed in between leaves a folder without a (readable)
    `trainer_state.json`, or with a truncated weights file, index or shard.
    """
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as file:
            state = json.load(file)
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or "global_step" not in state:
        return False
    weights = next((name for name in WEIGHTS_NAMES if os.path.isfile(os.path.join(path, name))), None)
    return weights is not None and _readable_weights(os.path.join(path, weights))


def _readable_weights(path: str) -> bool:
    """Whether a weights file is whole, read as far as telling so takes (headers and indices, not the tensors).

    An index (`*.index.json`) is whole when every shard it names is; a safetensors file when its
    header and the length it announces fit in the file; a `torch.save` file (a zip archive) when its
    central directory, written last, is there. Nothing is unpickled.
    """
    try:
        if path.endswith(".index.json"):
            with open(path, encoding="utf-8") as file:
                shards = set(json.load(file)["weight_map"].values())
            folder = os.path.dirname(path)
            return bool(shards) and all(_readable_weights(os.path.join(folder, shard)) for shard in shards)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:  # a truncated file fails its length check
                file.keys()
            return True
        with zipfile.ZipFile(path):
            return True
    except Exception:  # OSError, ValueError, KeyError, BadZipFile, safetensors' own errors, ...
        return False


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that is complete, or None.

    Unlike `transformers.trainer_utils.get_last_checkpoint`, which takes the largest N whatever
    the folder holds, an incomplete folder (a run killed while saving) is passed over with a warning.
    """
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
        logger.warning("Ignoring the incomplete checkpoint %s (no readable trainer_state.json or weights).", path)
    return None


__all__ = ["CHECKPOINT_PATTERN", "WEIGHTS_NAMES", "is_complete_checkpoint", "last_complete_checkpoint"]
