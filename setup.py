"""Build and install fatezero-fast.

    pip install --no-build-isolation -e .

builds the extension `fatezero_fast._C` from csrc/ with the installed torch: the C++ CPU ops
(csrc/*.cpp, OpenMP) always, plus the CUDA ops (csrc/*.cu, sm_80 and sm_90) when that torch
has CUDA and a CUDA toolkit is found (set FATEZERO_FAST_CPU_ONLY=1 to skip them;
FATEZERO_FAST_CUDA_ARCHS=90 to build for sm_90 alone, MAX_JOBS=N for N parallel compiles). The Triton
kernels in kernels/ ship as `fatezero_fast.kernels`. --no-build-isolation: the extension must
be compiled against the torch you run with, so torch is not a build requirement.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
os.chdir(HERE)  # setuptools wants relative source paths

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("fatezero-fast: torch must be installed first (pip install torch), then "
             "`pip install --no-build-isolation -e .`")


def read_version() -> str:
    with open(os.path.join("fatezero_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    cxx_flags = ["-O3", "-ffp-contract=fast", "-Wno-psabi", *openmp]  # no -march: the binary must run on any x86-64
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and bool(cu_sources)
                 and os.environ.get("FATEZERO_FAST_CPU_ONLY", "0") in ("", "0"))
    if with_cuda:
        # FATEZERO_FAST_CUDA_ARCHS=90 builds for Hopper alone (half the nvcc time; benchmarks/gpu_check.sh)
        archs = [a.strip() for a in os.environ.get("FATEZERO_FAST_CUDA_ARCHS", "80,90").split(",") if a.strip()]
        print(f"fatezero-fast: building C++ CPU ops + CUDA ops for {', '.join('sm' + a for a in archs)}", flush=True)
        nvcc_flags = ["-O3"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs[:-1]] + \
            [f"-gencode=arch=compute_{archs[-1]},code=[sm_{archs[-1]},compute_{archs[-1]}]"]  # + PTX for newer GPUs
        return CUDAExtension("fatezero_fast._C", cpp_sources + cu_sources,
                             extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                             extra_link_args=openmp)
    why = ""
    if cu_sources and torch.version.cuda is None:
        why = " (this torch has no CUDA)"
    elif cu_sources and CUDA_HOME is None:
        why = " (no CUDA toolkit found: set CUDA_HOME)"
    elif cu_sources:
        why = " (FATEZERO_FAST_CPU_ONLY is set)"
    print(f"fatezero-fast: building C++ CPU ops{why}", flush=True)
    return CppExtension("fatezero_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=openmp)


packages = find_packages(include=["fatezero_fast", "fatezero_fast.*"])
package_dir = {}
if os.path.isdir("kernels"):  # the Triton kernels, shipped as fatezero_fast.kernels
    packages.append("fatezero_fast.kernels")
    package_dir["fatezero_fast.kernels"] = "kernels"

setup(
    name="fatezero-fast",
    version=read_version(),
    description="Memory-optimized fused attention kernels for FateZero zero-shot video editing",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"fatezero_fast": ["models/data/*", "toyworld/model/*", "toyworld/model/*/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "numpy",
        "pillow",
        "imageio>=2.30",
        "imageio-ffmpeg",
        "pyyaml",
        "tqdm",
        "safetensors",
    ],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest"]},
    entry_points={"console_scripts": ["fatezero-fast = fatezero_fast.io.cli:main"]},
    zip_safe=False,
)
