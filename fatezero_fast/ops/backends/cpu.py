"""cpu backend of blended_attention: the C++ kernel in fatezero_fast._C (csrc/).

Tiled online softmax with fp32 accumulation, OpenMP over (frame, head, query tile), O(Nq*D)
extra memory (never an Nq x Nk map). `available()` is False when the extension was not built;
importing this module never fails because of it.
"""
from __future__ import annotations

import torch

from ..source import Source, SourceForm

_op = None          # torch.ops.fatezero_fast.blended_attention once loaded
_load_error = None  # why it could not be loaded (str), once tried


def _load():
    """Import fatezero_fast._C (its static initializers register the op) once, and cache the op."""
    global _op, _load_error
    if _op is None and _load_error is None:
        try:
            from ... import _C  # noqa: F401  (registers torch.ops.fatezero_fast.*)
            _op = torch.ops.fatezero_fast.blended_attention
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _load_error = f"{type(exc).__name__}: {exc}"
    return _op


def load_error() -> str | None:
    """Why the C++ extension is unavailable (None when it loaded)."""
    _load()
    return _load_error


def available(device=None) -> bool:
    """True when the C++ extension is built and the op is registered (CPU tensors only)."""
    if device is not None and torch.device(device).type != "cpu":
        return False
    return _load() is not None


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    """out = M softmax(Q K_e^T s) V_e + (1 - M) P_s V_e on CPU; inputs validated and `source` parsed by ops.api."""
    source = Source.of(source)
    op = _load()
    if op is None:
        raise RuntimeError(f"the cpu backend needs fatezero_fast._C ({_load_error}); rebuild with "
                           "`pip install --no-build-isolation -e .`")
    dtype = q.dtype
    q = q.contiguous()
    k = k.to(dtype).contiguous()
    v = v.to(dtype).contiguous()
    kv_frames = kv_frames.to(device=q.device, dtype=torch.long).contiguous()
    row_scale = None if source.row_scale is None else source.row_scale.to(torch.float32).contiguous()
    src_a, src_b = (None if t is None else t.contiguous() for t in (source.a, source.b))
    if source.form is not SourceForm.NONE and mask is not None:
        mask = mask.to(device=q.device, dtype=torch.float32).contiguous()
    else:
        mask = None  # no source: plain attention; no mask with a source: full source
    target = out if out is not None and out.is_contiguous() else torch.empty_like(q, memory_format=torch.contiguous_format)
    op(q, k, v, kv_frames, int(source.form), src_a, src_b, row_scale, mask, float(scale), target)
    if out is None:
        return target
    if target is not out:
        out.copy_(target)
    return out
