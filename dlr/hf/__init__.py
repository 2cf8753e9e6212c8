"""HF-native model classes; registered with the Auto classes on import."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dlr import DlrLlamaConfig
from .lowrank import LowRankLinear
from .modeling_dlr import DlrLlamaForCausalLM

AutoConfig.register(DlrLlamaConfig.model_type, DlrLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(DlrLlamaConfig, DlrLlamaForCausalLM, exist_ok=True)
# save_pretrained then copies the modeling files and writes `auto_map`, so a saved
# directory loads with trust_remote_code=True where dlr is not installed.
DlrLlamaConfig.register_for_auto_class()
DlrLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DlrLlamaConfig", "DlrLlamaForCausalLM", "LowRankLinear"]
