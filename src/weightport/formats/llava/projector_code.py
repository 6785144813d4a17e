'''The remote-code modules written into an xtuner-llava `projector/` directory, so that
`AutoModel.from_pretrained(projector_dir, trust_remote_code=True)` loads the projector as xtuner's
own ProjectorModel does: same class names, config fields and parameter names (`model.0`, `model.2`).
Written for weightport from the format's description; they define classes and run nothing on import.'''

CONFIGURATION = """\
from transformers import PretrainedConfig


class ProjectorConfig(PretrainedConfig):
    model_type = "projector"
    _auto_class = "AutoConfig"

    def __init__(self, visual_hidden_size=4096, llm_hidden_size=4096, depth=2, hidden_act="gelu", bias=True,
                 **kwargs):
        self.visual_hidden_size = visual_hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.depth = depth
        self.hidden_act = hidden_act
        self.bias = bias
        super().__init__(**kwargs)
"""

MODELING = """\
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_projector import ProjectorConfig


class ProjectorModel(PreTrainedModel):
    _auto_class = "AutoModel"
    config_class = ProjectorConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__(config)
        layers = [nn.Linear(config.visual_hidden_size, config.llm_hidden_size, bias=config.bias)]
        for _ in range(1, config.depth):
            layers.append(ACT2FN[config.hidden_act])
            layers.append(nn.Linear(config.llm_hidden_size, config.llm_hidden_size, bias=config.bias))
        self.model = nn.Sequential(*layers)
        self.post_init()

    def forward(self, x):
        return self.model(x)
"""

FILES = {"configuration_projector.py": CONFIGURATION, "modeling_projector.py": MODELING}
