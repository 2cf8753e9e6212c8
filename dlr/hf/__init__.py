"""HF-native model classes, registered with transformers' Auto classes on import.

After `import dlr.hf`, a model directory loads with trust_remote_code=False: transformers then
uses these classes, not the code files shipped in the directory.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_dlr import DlrLlamaConfig
from .lowrank import LowRankLinear
from .modeling_dlr import DlrLlamaForCausalLM, DlrLlamaModel

AutoConfig.register(DlrLlamaConfig.model_type, DlrLlamaConfig, exist_ok=True)
AutoModel.register(DlrLlamaConfig, DlrLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DlrLlamaConfig, DlrLlamaForCausalLM, exist_ok=True)
# save_pretrained then copies the modeling files, so a saved directory also loads with
# trust_remote_code=True where dlr is not installed.
DlrLlamaConfig.register_for_auto_class()
DlrLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DlrLlamaConfig", "DlrLlamaForCausalLM", "DlrLlamaModel", "LowRankLinear"]
