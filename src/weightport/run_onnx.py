"""`weightport run`: an ONNX export on ONNX Runtime's CPU provider: the next-token distribution of a
prompt, and greedy generation that feeds back the KV cache when the export has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightportError
from .formats.onnx import MANIFEST
from .hf_config import load_json

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
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise WeightportError(f"{self.directory}: no {MANIFEST}; not a weightport ONNX export")
        manifest = load_json(manifest_path)
        self.graph = manifest["graphs"]["decoder"]
        self.sizes = manifest["model"]
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
        self.session = onnxruntime.InferenceSession(str(self.directory / self.graph["file"]), options,
                                                    providers=["CPUExecutionProvider"])

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise WeightportError("the prompt encodes to no tokens")
        return ids

    def _empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.sizes["n_kv"], 0, self.sizes["head_dim"])
        return {f"past_key_values.{l}.{kind}": np.zeros(shape, self.cache_dtype)
                for l in range(self.sizes["n_layer"]) for kind in ("key", "value")}

    def forward(self, ids: list[int], past_len: int = 0, cache: dict | None = None) -> tuple[np.ndarray, dict]:
        """Logits of the last position, and the cache after `ids` (empty without --with-past)."""
        n = len(ids)
        feed = {"input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, past_len + n), np.int64),
                "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None]}
        if self.graph["with_past"]:
            feed.update(cache if cache is not None else self._empty_cache())
        outputs = self.session.run(None, feed)
        named = dict(zip(self.graph["outputs"], outputs))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in named.items() if k.startswith("present.")}
        return named["logits"][0, -1], present

    def top_k(self, prompt: str, k: int) -> list[Prediction]:
        logits, _ = self.forward(self.encode(prompt))
        probs = _softmax(logits.astype(np.float64))
        best = np.argsort(-probs, kind="stable")[:k]
        return [Prediction(int(i), self.tokenizer.id_to_token(int(i)) or "", float(probs[i])) for i in best]

    def generate(self, prompt: str, n: int) -> list[int]:
        """Greedy: with a cache each step feeds one token; without, the whole sequence again."""
        ids = self.encode(prompt)
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
