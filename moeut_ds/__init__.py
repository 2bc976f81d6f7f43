"""moeut-ds: MoEUT (Mixture-of-Experts Universal Transformers) with DeepSpeed.

Text generation is `moeut_ds.model.generate` (the name `moeut_ds.generate` is the `python -m moeut_ds.generate`
command's module, which replaces any package attribute of that name once it is imported)."""
from moeut_ds.config import ConfigError, ModelConfig
from moeut_ds.model import LanguageModel, LMOutput
from moeut_ds.model_io import load_model, save_model
from moeut_ds.presets import PRESETS, get_preset

__all__ = ["ConfigError", "ModelConfig", "LanguageModel", "LMOutput", "load_model", "save_model",
           "PRESETS", "get_preset"]
