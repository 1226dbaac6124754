"""sar_hf.checkpoints: which checkpoint folders are complete, and the last complete one."""

import json

import torch

from sar_hf.checkpoints import is_complete_checkpoint, last_complete_checkpoint


def _checkpoint(folder, step, state=True, weights=True):
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        save_file({"w": torch.zeros(64, 64)}, str(path / "model.safetensors"))
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return str(path)


def test_last_complete_checkpoint_skips_half_written_folders(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "none")) is None
    good = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 100)
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
    # Killed before trainer_state.json, while writing it, or while writing the weights.
    _checkpoint(tmp_path, 200, state=False)
    half = _checkpoint(tmp_path, 300)
    (tmp_path / "checkpoint-300" / "trainer_state.json").write_text('{"global_step": 3')
    cut = _checkpoint(tmp_path, 400)
    weights = tmp_path / "checkpoint-400" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _checkpoint(tmp_path, 500, weights=False)
    (tmp_path / "checkpoint-600").write_text("a file, not a folder")
    assert not any(is_complete_checkpoint(p) for p in (half, cut, str(tmp_path / "checkpoint-200")))
    assert is_complete_checkpoint(good)
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
