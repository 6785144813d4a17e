"""One tiny model per architecture weightport knows (and a few variants whose tensors differ:
tied embedding, biases, no q LoRA, Qwen-VL's vision tower), as the `Model` that every
format's `target_rules(model, layout, tp)` takes.

The configs are the ones the format tests already build their checkpoints from, imported rather
than copied, so a sample is exactly what some test converts. Each is small (1-3 layers) so that
the rule snapshot built from them stays readable.
"""

from __future__ import annotations

import conftest
import llava_parts
import test_mindspore_baichuan as baichuan
import test_mindspore_cogvlm2 as cogvlm2
import test_mindspore_deepseek_v2 as deepseek_v2
import test_mindspore_glm as glm
import test_mindspore_gpt2 as gpt2
import test_mindspore_internlm as internlm
import test_mindspore_qwen as qwen
import test_mindspore_whisper as whisper
import test_nanotron_idefics3 as idefics3
from weightport.archs import Model, model_from_hf_config


def _llama_family(key: str) -> dict:
    """conftest.MODELS[key] as the config.json build_hf would save (model_type plus the sizes)."""
    model_type, extra = conftest.MODELS[key]
    return {"model_type": model_type, **conftest.BASE, **extra}


# sample name -> Hugging Face config.json contents
CONFIGS: dict[str, dict] = {
    "llama": _llama_family("llama3"),  # GQA: 4 heads over 2 KV heads
    "llama-tied": _llama_family("llama3.2"),
    "llama-bias": _llama_family("llama-bias"),
    "mistral": _llama_family("mistral"),
    "mixtral": _llama_family("mixtral"),
    "qwen2": _llama_family("qwen2"),
    "phi3": _llama_family("phi3"),
    "gemma": _llama_family("gemma"),
    "deepseek_v2": {**deepseek_v2.CONFIG, "model_type": "deepseek_v2", "q_lora_rank": deepseek_v2.Q_LORA["q_lora"]},
    "deepseek_v2-lite": {**deepseek_v2.CONFIG, "model_type": "deepseek_v2",
                         "q_lora_rank": deepseek_v2.Q_LORA["no_q_lora"]},
    "chatglm": glm.CONFIG,
    "gpt2": {"model_type": "gpt2", **gpt2.SIZES},
    "qwen": qwen.CONFIG,
    "qwen-vl": qwen.VL_CONFIG,
    "whisper": {"model_type": "whisper", **whisper.SIZES},
    "baichuan-7b": baichuan.CONFIGS["7b"],
    "baichuan-13b": baichuan.CONFIGS["13b"],
    "internlm": internlm.INTERNLM,
    "internlm2": internlm.INTERNLM2,
    "cogvlm2": cogvlm2.CONFIGS["image"],
    "cogvlm2_video": cogvlm2.CONFIGS["video"],
    "idefics3": {"model_type": "idefics3", "text_config": idefics3.TEXT, "vision_config": idefics3.VISION,
                 "image_token_id": idefics3.IMAGE_TOKEN, "scale_factor": 2},
    # llava_parts builds its LLaVA from these parts (a CLIP tower, a Llama 3 text model)
    "llava": {"model_type": "llava", "text_config": _llama_family("llama3"),
              "vision_config": {"model_type": "clip_vision_model", **llava_parts.VISION}},
}


def model(name: str) -> Model:
    return model_from_hf_config(CONFIGS[name], name)


SAMPLES: dict[str, Model] = {name: model(name) for name in CONFIGS}

