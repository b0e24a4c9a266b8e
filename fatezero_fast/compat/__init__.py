"""Backends for existing FateZero-based code.

- `fatezero_fast.compat.fatezero`: run an unmodified checkout of the official FateZero code
  (ChenyangQiQi/FateZero) with the fused attention: call `fatezero.patch()` before its pipeline runs.

Nothing here imports the official code until it is asked to: the official repository is never
part of this package; it must be importable (on sys.path, or named by FATEZERO_SRC).
"""

__all__ = ["fatezero"]
