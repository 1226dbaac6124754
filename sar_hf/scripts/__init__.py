"""What the `sar-hf` command runs, as TRL's `trl/scripts`: one module per command and the pieces they share.

* `train`: `sar-hf train`, the training script (also `examples/run_sar.py`).
* `inspect_attention`: `sar-hf inspect`, the [CLS] maps' spatial entropy of any checkpoint, per layer and head.
* `arguments`: the training script's argument dataclasses and their parser.
* `utils`: the training script's reusable steps (resume, load the data, build the model).
* `deit_recipe`: DeiT's training recipe: its values, flags, learning-rate rule and augmentations.

Nothing is imported here, so that `sar-hf inspect` does not pay for the training script's imports.
"""
