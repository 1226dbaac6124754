#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "sar_hf[examples]",  # this repository: pip install -e ".[examples]"
# ]
# ///
"""Train or fine-tune a ViT-family image classifier with the spatial-entropy regulariser (SAR).

This is `sar-hf train` as a script, with the same flags:

    python examples/run_sar.py                   # a small SAR ViT on the bundled digits -> outputs/sar-digits
    python examples/run_sar.py --help            # every flag, and more examples
    python examples/run_sar.py my_run.json       # every argument from a JSON file
    accelerate launch --config_file examples/accelerate_configs/two_cpu_processes.yaml examples/run_sar.py \\
        --use_cpu --ddp_backend gloo             # two processes on a CPU

The script itself is `sar_hf/scripts/train.py`, read top to bottom like Transformers'
`run_image_classification.py`; it lives in the package, as TRL's scripts do, so that the `sar-hf`
command runs it from an installed package too. The README shows the usual commands.
"""

from sar_hf.scripts.train import main

if __name__ == "__main__":
    main()
