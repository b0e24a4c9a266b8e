"""fatezero-fast: memory-optimized attention kernels and a thin editing pipeline for FateZero.

The public API is importable from here; modules load on first use, so `import fatezero_fast`
stays cheap (the CLI's --help does not pay for torch and diffusers).
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

_PUBLIC = {
    "FateZeroPipeline": "edit.pipeline",
    "EditResult": "edit.pipeline",
    "Inversion": "edit.inversion",
    "FateZeroController": "edit.controller",
    "EditOptions": "semantics.plan",
    "VideoAttentionConfig": "unet.processors",
    "blended_attention": "ops",
    "blend_mask": "ops",
    "SourceForm": "ops",
    "make_store": "stores",
    "load_video": "io.video",
    "save_video": "io.video",
    "InputError": "errors",
}
# Module paths of release 0.1 that the README showed; they keep working for one release.
_MOVED = {
    "pipeline": "edit.pipeline",
    "controller": "edit.controller",
    "control": "semantics.plan",
    "store": "stores",
    "video": "io.video",
    "cli": "io.cli",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import fatezero_fast.pipeline` (a 0.1 path) gives fatezero_fast.edit.pipeline, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len(__name__) + 1:] if fullname.startswith(__name__ + ".") else None
        return importlib.util.spec_from_loader(fullname, self) if old in _MOVED else None

    def create_module(self, spec):
        old = spec.name[len(__name__) + 1:]
        warnings.warn(f"{spec.name} moved to {__name__}.{_MOVED[old]} (or import from {__name__} directly); "
                      "the old path goes away in the next release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(f"{__name__}.{_MOVED[old]}")

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModule())
