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


def test_a_sharded_checkpoint_needs_every_shard(tmp_path):
    """An index names its shards: a folder with the index but without (or with a cut) shard is not complete."""
    from safetensors.torch import save_file

    path = _checkpoint(tmp_path, 10, weights=False)
    folder = tmp_path / "checkpoint-10"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 2 * 64 * 64 * 4}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not is_complete_checkpoint(path)  # the index alone: killed before any shard was written
    save_file({"a": torch.zeros(64, 64)}, str(folder / shards[0]))
    assert not is_complete_checkpoint(path)  # killed between the shards
    save_file({"b": torch.zeros(64, 64)}, str(folder / shards[1]))
    assert is_complete_checkpoint(path)
    whole = (folder / shards[1]).read_bytes()
    (folder / shards[1]).write_bytes(whole[:1000])
    assert not is_complete_checkpoint(path)  # killed while writing the last shard
    (folder / shards[1]).write_bytes(whole)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index)[:40])
    assert not is_complete_checkpoint(path)  # killed while writing the index


def test_a_pytorch_model_bin_must_be_whole(tmp_path):
    """`save_safetensors=False` checkpoints: a cut `pytorch_model.bin` (or one of its shards) is not complete."""
    path = _checkpoint(tmp_path, 10, weights=False)
    weights = tmp_path / "checkpoint-10" / "pytorch_model.bin"
    torch.save({"w": torch.zeros(64, 64)}, weights)
    assert is_complete_checkpoint(path)
    weights.write_bytes(weights.read_bytes()[:1000])
    assert not is_complete_checkpoint(path)

    path = _checkpoint(tmp_path, 20, weights=False)
    folder = tmp_path / "checkpoint-20"
    index = {"metadata": {}, "weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert not is_complete_checkpoint(path)
    torch.save({"w": torch.zeros(64, 64)}, folder / "pytorch_model-00001-of-00001.bin")
    assert is_complete_checkpoint(path)
