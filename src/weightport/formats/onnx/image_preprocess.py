"""CLIPImageProcessor's preprocessing (what LLaVA-1.5 feeds its vision tower), from its
preprocessor_config.json: RGB, shortest edge resized, center crop, rescale, normalize; with PIL
and numpy so `weightport run` needs no transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import WeightportError


def clip_pixels(image: str | Path, cfg: dict, dtype=np.float32) -> np.ndarray:
    """pixel_values [1, 3, H, W] for one image file."""
    try:
        from PIL import Image
    except ImportError:
        raise WeightportError("--image needs pillow: pip install 'weightport[onnx]'") from None
    try:
        img = Image.open(image)
        img.load()
    except (OSError, ValueError) as e:
        raise WeightportError(f"{image}: not a readable image ({e})") from None
    img = img.convert("RGB")
    if cfg.get("do_resize", True):
        short = cfg["size"]["shortest_edge"]
        w, h = img.size
        # transformers' get_resize_output_image_size: the long side scaled with int() truncation
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, resample=cfg.get("resample", 3))
    x = np.asarray(img, dtype=np.float32)
    if cfg.get("do_center_crop", True):
        ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
        top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
        x = x[top:top + ch, left:left + cw]
    if cfg.get("do_rescale", True):
        x = x * np.float32(cfg.get("rescale_factor", 1 / 255))
    if cfg.get("do_normalize", True):
        x = (x - np.array(cfg["image_mean"], np.float32)) / np.array(cfg["image_std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(dtype)
