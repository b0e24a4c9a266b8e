"""triton backend of blended_attention: the fused kernel in kernels/blended_attention.py.

The kernels package is imported lazily, on first use: Triton decides whether kernels are
interpreted (TRITON_INTERPRET=1, CPU) or compiled when they are decorated, so importing
`fatezero_fast.ops` must not fix that choice. Installed, the kernels are `fatezero_fast.kernels`
(setup.py's package_dir); in a source checkout the top-level kernels/ directory is loaded
under that same name.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ..capabilities import FLOAT_DTYPES, Capabilities

# On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), where bf16 tl.dot is wrong.
CAPABILITIES = Capabilities(dtypes={"cuda": FLOAT_DTYPES, "cpu": (torch.float32, torch.float16)},
                            notes={"cpu": "bf16 tl.dot is wrong in Triton's interpreter"})

_kernels = None


def _triton_importable() -> bool:
    if "triton" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _load_kernels():
    """The kernels module: `fatezero_fast.kernels` when installed, else the checkout's `kernels/`.

    Installed (a wheel or a regular install), the kernels sit inside the package directory. Otherwise
    the kernels/ directory next to the package -- a source checkout, or an editable install, whose
    kernels are that same directory -- is loaded by path under the name `fatezero_fast.kernels`, so
    that neither an unrelated `kernels` package on sys.path nor another checkout's editable install
    can be picked up instead.
    """
    global _kernels
    if _kernels is not None:
        return _kernels
    import fatezero_fast

    pkg_dir = os.path.dirname(os.path.abspath(fatezero_fast.__file__))
    name = "fatezero_fast.kernels"
    if os.path.isfile(os.path.join(pkg_dir, "kernels", "__init__.py")):  # installed layout
        mod = importlib.import_module(name)
    else:
        init = os.path.join(os.path.dirname(pkg_dir), "kernels", "__init__.py")
        if not os.path.isfile(init):
            raise ImportError(f"fatezero_fast.kernels is not installed and no kernels/ directory was found "
                              f"next to the package ({os.path.dirname(pkg_dir)})")
        spec = importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[os.path.dirname(init)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        fatezero_fast.kernels = mod
    _kernels = mod
    return _kernels


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def load_error(device=None) -> str | None:
    """Why the backend cannot run on `device` (None when it can): CUDA when triton imports; the CPU
    only under TRITON_INTERPRET=1 (the interpreter)."""
    device = torch.device("cpu" if device is None else device)
    if not _triton_importable():
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch has no usable CUDA device"
    if device.type != "cpu":
        return f"runs on cuda (and cpu in the interpreter) only, not {device.type}"
    if not _interpret_requested():
        return "on cpu only in Triton's interpreter (TRITON_INTERPRET=1 before the kernels are imported)"
    if _kernels is not None and not _kernels.INTERPRET:
        return "the kernels were imported compiled, not interpreted: they cannot run on cpu tensors"
    return None


def available(device=None) -> bool:
    """True on CUDA when triton imports; on CPU only under TRITON_INTERPRET=1 (the interpreter)."""
    return load_error(device) is None


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    """See fatezero_fast.ops.blended_attention (inputs validated there)."""
    return _load_kernels().blended_attention_fwd(q, k, v, kv_frames, source=source, mask=mask,
                                                 scale=scale, out=out)
