"""The tiny ViT and data that the tests share (Transformers' "model tester" sizes)."""

import torch
from torch.utils.data import Dataset

# 16 px images in 4 px patches: a 4x4 grid. `initializer_range` 0.2 (not ViT's 0.02) spreads the
# scores so that no patch score sits within rounding error of its row's mean.
TINY = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "num_labels": 3,
    "initializer_range": 0.2,
}


class TinyImages(Dataset):
    """`n` random 16x16 RGB images with labels in 0..2, fixed by `seed`."""

    def __init__(self, n: int = 8, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}
