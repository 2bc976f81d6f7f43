"""moeut-ds: MoEUT (Mixture-of-Experts Universal Transformers) with DeepSpeed."""
from moeut_ds.config import ConfigError, ModelConfig
from moeut_ds.model import LanguageModel, LMOutput, generate
from moeut_ds.model_io import load_model, save_model
from moeut_ds.presets import PRESETS, get_preset

__all__ = ["ConfigError", "ModelConfig", "LanguageModel", "LMOutput", "generate", "load_model", "save_model",
           "PRESETS", "get_preset"]
