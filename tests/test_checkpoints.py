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


def test_a_trainer_state_without_a_global_step_is_not_complete(tmp_path):
    """JSON that parses but is no Trainer state (an empty or foreign object, a list, a string) is not one."""
    path = _checkpoint(tmp_path, 10)
    state = tmp_path / "checkpoint-10" / "trainer_state.json"
    for text in ("{}", '{"log_history": []}', '["global_step"]', '"global_step"', "null"):
        state.write_text(text)
        assert not is_complete_checkpoint(path), text
    state.write_text('{"global_step": 10}')
    assert is_complete_checkpoint(path)


def test_only_checkpoint_folders_are_read_and_each_incomplete_one_is_named(tmp_path, caplog):
    """Trainer's own `runs/` (TensorBoard) and other folders or files sit next to the checkpoints: they are
    neither taken nor warned about; each incomplete checkpoint folder gets one warning that names it."""
    _checkpoint(tmp_path, 5)
    (tmp_path / "runs" / "Dec01_10-00-00").mkdir(parents=True)
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    (tmp_path / "checkpoint-8.tmp").mkdir()
    cut = _checkpoint(tmp_path, 7, state=False)
    with caplog.at_level("WARNING", logger="sar_hf.checkpoints"):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")
    assert [(record.name, record.levelname, record.getMessage()) for record in caplog.records] == [
        (
            "sar_hf.checkpoints",
            "WARNING",
            f"Ignoring the incomplete checkpoint {cut} (no readable trainer_state.json or weights).",
        )
    ]
