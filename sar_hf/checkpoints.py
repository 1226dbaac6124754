"""Which Trainer checkpoint folders are complete, so that a run killed while saving resumes from the last good one."""

import json
import logging
import os
import re

logger = logging.getLogger(__name__)

#: Trainer's checkpoint folders: `checkpoint-<global step>`.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
#: Weight files Trainer writes, one of which a complete checkpoint holds.
WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_complete_checkpoint(path: str) -> bool:
    """Whether Trainer finished writing the checkpoint folder `path`.

    Trainer writes the weights, then the optimizer, scheduler and RNG states, and
    `trainer_state.json` last; a run killed in between leaves a folder without a (readable)
    `trainer_state.json`, or with a truncated weights file.
    """
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as file:
            state = json.load(file)
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or "global_step" not in state:
        return False
    weights = next((name for name in WEIGHTS_NAMES if os.path.isfile(os.path.join(path, name))), None)
    if weights is None:
        return False
    if weights == "model.safetensors":
        from safetensors import safe_open

        try:  # reads the header only; a truncated file fails its length check
            with safe_open(os.path.join(path, weights), framework="pt") as file:
                file.keys()
        except Exception:
            return False
    return True


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
