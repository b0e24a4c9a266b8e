"""The toy world: a deterministic generator of short captioned clips with ground-truth object masks
(world.py), a small Stable-Diffusion-architecture model trained on it (model.py, model/), and the
demo that edits its clips (demo.py)."""
