"""Models the project builds itself: random-weight SD models and the real CLIP tokenizer."""
from .random import CONFIGS, SCHEDULER_CONFIG, random_components, save_random_model

__all__ = ["CONFIGS", "SCHEDULER_CONFIG", "random_components", "save_random_model"]
