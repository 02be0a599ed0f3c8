"""LoRA-the-Explorer: the algorithm and its formats. No networking here (that is `lte.net`, imported separately)."""
from lte.checkpoint import CheckpointError, load_checkpoint
from lte.config import RunSpec, load_spec
from lte.errors import ConfigError
from lte.lora import LoRALinear, LTEModel, mhlora_model, prepare_model
from lte.merge import HeadContribution, MergeUpdate, apply_update, merge_contributions
from lte.models import create_base_model

__all__ = [
    "CheckpointError", "ConfigError", "HeadContribution", "LTEModel", "LoRALinear", "MergeUpdate", "RunSpec",
    "apply_update", "create_base_model", "load_checkpoint", "load_spec", "merge_contributions", "mhlora_model",
    "prepare_model",
]
__version__ = "0.1.0"
