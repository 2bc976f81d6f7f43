"""Plain single-device PyTorch model: no DeepSpeed, ranks or launchers in here."""
from moeut_ds.model.generation import generate
from moeut_ds.model.lm import LanguageModel, LMOutput

__all__ = ["LanguageModel", "LMOutput", "generate"]
