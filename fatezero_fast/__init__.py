"""fatezero-fast: memory-optimized attention kernels and a thin editing pipeline for FateZero."""
__version__ = "0.1.0"
