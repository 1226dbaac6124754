"""Image processors and the per-image transform: RGB conversion, resizing and normalisation, with PIL and torch.

torchvision does not install beside every torch build, so nothing here needs it: the processors
fall back to their PIL versions, and [`ImageTransform`] converts, resizes and normalises as they
do, adding a mild random crop and flip for training. DeiT's batch augmentations are in
`sar_hf.scripts.deit_recipe`.
"""

import inspect
import math

import numpy as np
import torch


def load_image_processor(name_or_path: str, **kwargs):
    """`AutoImageProcessor.from_pretrained`, or `ViTImageProcessor` where the Auto class needs torchvision.

    Some transformers releases (5.9, for one) refuse `AutoImageProcessor` without torchvision,
    which does not install beside every torch build; ViT-family processors load as ViT's.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except ImportError:
        return vit_image_processor_class().from_pretrained(name_or_path, **kwargs)


def vit_image_processor_class():
    """ViT's image processor class for this install: the torchvision one, else the PIL one."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import ViTImageProcessor

        return ViTImageProcessor
    from transformers import ViTImageProcessorPil  # the same processor without torchvision

    return ViTImageProcessorPil


def processor_size(image_processor) -> tuple[int, int]:
    """`(height, width)` that an image processor produces: its crop size if it crops, else its size."""

    def read(size):
        if size is None:
            return None
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
        return None

    cropped = (
        read(getattr(image_processor, "crop_size", None))
        if getattr(image_processor, "do_center_crop", False)
        else None
    )
    size = cropped or read(getattr(image_processor, "size", None))
    if size is None:
        raise ValueError(
            f"Cannot tell the output size of {type(image_processor).__name__} "
            f"(size={getattr(image_processor, 'size', None)})."
        )
    return size


def to_rgb(image):
    """A PIL image of any mode (L, P, RGBA, ...) as RGB, converted as Transformers' image processors convert it.

    That is `transformers.image_transforms.convert_to_rgb`, which the processors run with
    `do_convert_rgb=True`: newer Transformers releases composite transparency onto white, older
    ones (5.9) drop the alpha channel. Training converts as the saved processor does at inference.
    """
    from PIL import Image as PILImage
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:  # the compositing releases
        return PILImage.fromarray(convert_to_rgb(image, return_numpy=True))
    return convert_to_rgb(image)


class ImageTransform:
    """PIL image -> normalised `[3, H, W]` float tensor, with optional training augmentation.

    Every image is first converted to RGB as the image processors do ([`to_rgb`]). Without
    augmentation the whole image is resized to `size` (as `ViTImageProcessor` does). Training takes
    a random crop covering `crop_scale` of the area with an aspect ratio in [3/4, 4/3] (a mild
    `RandomResizedCrop`), resizes it to `size`, and flips it horizontally with probability 0.5 when
    `hflip`. Random numbers come from torch's global generator, which Trainer seeds, restores on
    resume and seeds per dataloader worker.

    Args:
        size (`tuple[int, int]`): output `(height, width)`.
        image_mean, image_std (`sequence of 3 floats`): per-channel normalisation, on `[0, 1]` pixels.
        augment (`bool`, *optional*, defaults to `False`): random crops (and flips).
        hflip (`bool`, *optional*, defaults to `False`): random horizontal flips when augmenting.
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.7, 1.0)`): area range of the crops.
        resample (`int`, *optional*): PIL's filter for the resize, e.g. the image processor's
            `resample`; defaults to bilinear.
    """

    def __init__(self, size, image_mean, image_std, augment=False, hflip=False, crop_scale=(0.7, 1.0), resample=None):
        self.size = tuple(size)
        mean = [float(m) for m in image_mean] if np.ndim(image_mean) else [float(image_mean)] * 3
        std = [float(s) for s in image_std] if np.ndim(image_std) else [float(image_std)] * 3
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.hflip = hflip
        self.crop_scale = crop_scale
        self.resample = 2 if resample is None else int(resample)  # PIL.Image.Resampling.BILINEAR

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = width * height
        low, high = self.crop_scale
        for _ in range(10):
            target = area * (low + (high - low) * torch.rand(()).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(()).item()
            ratio = math.exp(log_ratio)
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                left = (width - w) * torch.rand(()).item()
                top = (height - h) * torch.rand(()).item()
                return left, top, left + w, top + h
        return 0.0, 0.0, float(width), float(height)

    def pixels(self, image) -> torch.Tensor:
        """The RGB image, cropped, flipped and resized, as a `[3, H, W]` float tensor in `[0, 1]`."""
        from PIL import Image as PILImage

        image = to_rgb(image)
        height, width = self.size
        if self.augment:
            box = self._crop_box(*image.size)
            image = image.resize((width, height), self.resample, box=box)
            if self.hflip and torch.rand(()).item() < 0.5:
                image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        elif image.size != (width, height):
            image = image.resize((width, height), self.resample)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 'h w c -> c h w'

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[..., 3, H, W]` pixels in `[0, 1]` -> normalised with the per-channel mean and std."""
        return (pixels - self.mean) / self.std

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def collate_fn(examples) -> dict[str, torch.Tensor]:
    """Stacks `pixel_values` and `labels` of the transformed examples into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


__all__ = [
    "ImageTransform",
    "collate_fn",
    "load_image_processor",
    "processor_size",
    "to_rgb",
    "vit_image_processor_class",
]
