"""Build lstm_fused: one extension, lstm_fused._C.

A CUDAExtension when torch has CUDA and nvcc is found, a CppExtension otherwise.
Environment switches:
  LSTM_FUSED_FORCE_CUDA=1  build the CUDA extension even if detection says no
  LSTM_FUSED_FORCE_CPU=1   build the CPU-only extension even with CUDA around
  MAX_JOBS=N               parallel compile jobs (ninja)
  NVCC_THREADS=N           nvcc --threads (default 4)
  TORCH_CUDA_ARCH_LIST     GPU archs; defaults to "8.0;9.0" when no GPU is visible
  LSTM_FUSED_DEBUG=1       -O0 -g, no NDEBUG
Install with `pip install --no-build-isolation .` so the build uses your torch.
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("LSTM_FUSED_FORCE_CPU"):
        return False
    if env_flag("LSTM_FUSED_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cuda_include_dirs():
    """Headers of torch's nvidia-* wheels (cuBLAS, cuSPARSE, ...), for toolkits
    that lack them. Searched beside the installed torch package."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = []
    for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        if glob.glob(os.path.join(inc, "cublas*.h")) or glob.glob(os.path.join(inc, "cusparse*.h")):
            found.append(inc)
    return found


def extension():
    debug = env_flag("LSTM_FUSED_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx = opt + ["-fdiagnostics-color=always"]
    # at::parallel_for is a header template: without OpenMP it runs serially.
    # The OpenMP runtime is the one torch already loaded (libgomp).
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not want_cuda():
        print("lstm_fused: building the CPU-only extension", file=sys.stderr)
        return cpp_extension.CppExtension(
            "lstm_fused._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=link)

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = opt + [
        "--threads", os.environ.get("NVCC_THREADS", "4"),
        "--use_fast_math" if env_flag("LSTM_FUSED_FAST_MATH") else "-Xptxas=-v" if debug else "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    print("lstm_fused: building the CUDA extension for", os.environ.get("TORCH_CUDA_ARCH_LIST"),
          file=sys.stderr)
    return cpp_extension.CUDAExtension(
        "lstm_fused._C", sources,
        include_dirs=cuda_include_dirs(),
        define_macros=[("LSTM_FUSED_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DLSTM_FUSED_CUDA"], "nvcc": nvcc},
        extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
