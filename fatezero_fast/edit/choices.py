"""The names a run configuration chooses from, without importing torch (the CLI's --help shows them)."""

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
STORE_FORMS = ("recompute", "qk", "full", "fp16", "fp8", "lowrank")  # stores.FORMS
STORE_PLACEMENTS = ("device", "host", "disk")                      # stores.PLACEMENTS
LATENTS_PLACEMENTS = ("host", "disk")
BACKENDS = ("auto", "triton", "cuda", "sdpa", "cpu", "reference")         # blended_attention backends
