"""`weightport run`: an ONNX export on ONNX Runtime's CPU provider: the next-token distribution of a
prompt (with an image, for a LLaVA export), and greedy generation that feeds back the KV cache when
the export has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import WeightportError
from . import ONNX_MANIFEST
from ...hf_config import load_json

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Prediction:
    token_id: int
    token: str
    probability: float


class OnnxModel:
    def __init__(self, directory: str | Path):
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as e:
            raise WeightportError(f"weightport run needs {e.name}: pip install 'weightport[onnx]'") from None
        self.directory = Path(directory)
        manifest_path = self.directory / ONNX_MANIFEST
        if not manifest_path.is_file():
            raise WeightportError(f"{self.directory}: no {ONNX_MANIFEST}; not a weightport ONNX export")
        manifest = load_json(manifest_path)
        self.graph = manifest["graphs"]["decoder"]
        self.sizes = manifest["model"]
        self.image = manifest.get("image")
        if manifest["dtype"] not in NUMPY_DTYPES and self.graph["with_past"]:
            raise WeightportError(f"{self.directory}: a {manifest['dtype']} cache cannot be fed from numpy; "
                                  "export float32 or float16 to run it")
        self.cache_dtype = NUMPY_DTYPES.get(manifest["dtype"], np.float32)
        tokenizer_path = self.directory / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise WeightportError(f"{self.directory}: no tokenizer.json to encode the prompt with")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {name: onnxruntime.InferenceSession(str(self.directory / g["file"]), options,
                                                            providers=["CPUExecutionProvider"])
                         for name, g in manifest["graphs"].items()}
        self._image_features: np.ndarray | None = None

    def encode(self, prompt: str, image: str | Path | None = None) -> list[int]:
        """Token ids of the prompt; with an image, its token expanded to one per image feature (the
        image goes first when the prompt does not place it)."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise WeightportError("the prompt encodes to no tokens")
        if self.image is None:
            if image is not None:
                raise WeightportError(f"{self.directory}: a text-only export; --image needs a LLaVA export")
            return ids
        token = self.image["token_id"]
        if image is None:
            if token in ids:
                raise WeightportError("the prompt has an image token but no --image was given")
            self._image_features = None
            return ids
        if ids.count(token) > 1:
            raise WeightportError(f"the prompt has {ids.count(token)} image tokens for one --image")
        at = ids.index(token) if token in ids else 0
        rest = ids[at + 1:] if token in ids else ids
        self._image_features = self.sessions["vision"].run(None, {"pixel_values": self._pixels(image)})[0]
        return ids[:at] + [token] * self.image["tokens_per_image"] + rest

    def _pixels(self, image: str | Path) -> np.ndarray:
        from .image_preprocess import clip_pixels  # pillow only when there is an image

        return clip_pixels(image, load_json(self.directory / "preprocessor_config.json"), self.cache_dtype)

    def _empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.sizes["n_kv"], 0, self.sizes["head_dim"])
        return {f"past_key_values.{l}.{kind}": np.zeros(shape, self.cache_dtype)
                for l in range(self.sizes["n_layer"]) for kind in ("key", "value")}

    def forward(self, ids: list[int], past_len: int = 0, cache: dict | None = None) -> tuple[np.ndarray, dict]:
        """Logits of the last position, and the cache after `ids` (empty without --with-past)."""
        n = len(ids)
        feed = {"attention_mask": np.ones((1, past_len + n), np.int64),
                "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None]}
        if "embed" in self.sessions:
            feed["inputs_embeds"] = self._embeds(ids)
        else:
            feed["input_ids"] = np.array([ids], np.int64)
        if self.graph["with_past"]:
            feed.update(cache if cache is not None else self._empty_cache())
        outputs = self.sessions["decoder"].run(None, feed)
        named = dict(zip(self.graph["outputs"], outputs))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in named.items() if k.startswith("present.")}
        return named["logits"][0, -1], present

    def _embeds(self, ids: list[int]) -> np.ndarray:
        embeds = self.sessions["embed"].run(None, {"input_ids": np.array([ids], np.int64)})[0]
        at = np.array(ids) == self.image["token_id"]
        if at.any():
            embeds[0, at] = self._image_features.reshape(-1, embeds.shape[-1])
        return embeds

    def top_k(self, prompt: str, k: int, image: str | Path | None = None) -> list[Prediction]:
        logits, _ = self.forward(self.encode(prompt, image))
        probs = _softmax(logits.astype(np.float64))
        best = np.argsort(-probs, kind="stable")[:k]
        return [Prediction(int(i), self.tokenizer.id_to_token(int(i)) or "", float(probs[i])) for i in best]

    def generate(self, prompt: str, n: int, image: str | Path | None = None) -> list[int]:
        """Greedy: with a cache each step feeds one token; without, the whole sequence again."""
        ids = self.encode(prompt, image)
        logits, cache = self.forward(ids)
        new = []
        for step in range(n):
            new.append(int(np.argmax(logits)))
            if step == n - 1:
                break
            if self.graph["with_past"]:
                logits, cache = self.forward(new[-1:], len(ids) + len(new) - 1, cache)
            else:
                logits, _ = self.forward(ids + new)
        return new


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
