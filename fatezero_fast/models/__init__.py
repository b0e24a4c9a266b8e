"""Models: random-weight SD models, the real CLIP tokenizer, and the formats of model folders
(plain SD 1.x/2.x, FateZero tuned, Tune-A-Video) with their loading."""
from .formats import ModelFormat, describe, detect
from .loading import load_unet
from .random import CONFIGS, SCHEDULER_CONFIG, random_components, save_random_model
from .tuned import save_random_tuned_model

__all__ = ["CONFIGS", "SCHEDULER_CONFIG", "ModelFormat", "describe", "detect", "load_unet", "random_components",
           "save_random_model", "save_random_tuned_model"]
