"""triton backend of blended_attention: the fused kernel in kernels/blended_attention.py.

The kernels are imported lazily, on first use: Triton decides whether kernels are interpreted
(TRITON_INTERPRET=1, CPU) or compiled when they are decorated, so importing `fatezero_fast.ops`
must not fix that choice.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_KERNELS = "fatezero_fast.kernels"


def _triton_importable() -> bool:
    if "triton" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _load_kernels():
    """`fatezero_fast.kernels`: installed, the package's kernels/ (setup.py's package_dir); in a source
    checkout or an editable install, the top-level kernels/ next to the package. Loaded by path, so
    that neither an unrelated `kernels` on sys.path nor another checkout's editable install stands in.
    """
    if _KERNELS not in sys.modules:
        import fatezero_fast

        package = os.path.dirname(os.path.abspath(fatezero_fast.__file__))
        init = os.path.join(package, "kernels", "__init__.py")
        if not os.path.isfile(init):
            init = os.path.join(os.path.dirname(package), "kernels", "__init__.py")
        spec = importlib.util.spec_from_file_location(_KERNELS, init)
        sys.modules[_KERNELS] = module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_KERNELS]
            raise
        fatezero_fast.kernels = module
    return sys.modules[_KERNELS]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device=None) -> bool:
    """True on CUDA when triton imports; on CPU only under TRITON_INTERPRET=1 (the interpreter)."""
    import torch

    device = torch.device("cpu" if device is None else device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type != "cpu" or not _interpret_requested():
        return False
    # Kernels already imported in compiled mode cannot run on CPU tensors.
    return _KERNELS not in sys.modules or bool(sys.modules[_KERNELS].INTERPRET)


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    """See fatezero_fast.ops.blended_attention (inputs validated there)."""
    return _load_kernels().blended_attention_fwd(q, k, v, kv_frames, source=source, mask=mask,
                                                 scale=scale, out=out)
