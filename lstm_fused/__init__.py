"""lstm_fused: a fused LSTM for PyTorch, a drop-in for torch.nn.LSTM."""
import json

from . import ops  # noqa: F401  (imports torch, loads the kernels, registers the ops)
from . import _C
from .modules import LSTM
from .cell import LSTMCell
from .ops import cuda_plan
try:
    from . import quantization  # noqa: F401  (quantize_dynamic knows our modules)
except ImportError:  # a torch without eager-mode quantization
    pass


def cpu_isa():
    """The instruction set the CPU kernels run on this machine: "avx512",
    "avx2" or "generic" (BLAS GEMMs and a scalar cell). Chosen once per
    process; LSTM_FUSED_CPU_ISA=avx2 or =generic, set before the first call,
    picks a lower one."""
    return _C.cpu_isa()


def build_info():
    """How this extension was built: {"cuda": whether it has the CUDA kernels,
    "reason": why (the line the build printed), "cuda_version", "cuda_home",
    "cuda_archs" (None in a CPU-only build), "torch" and "torch_cuda" (the torch
    it was built against)}."""
    return json.loads(_C.build_info())


__all__ = ["LSTM", "LSTMCell", "build_info", "cpu_isa", "cuda_plan", "ops"]
__version__ = "0.1.0"
