import os

import torch

# Without a GPU, Triton's interpreter runs the kernels of `sar_hf.triton_kernels` on CPU tensors. Triton
# reads the variable when a kernel is defined, so it is set before any test imports that module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
