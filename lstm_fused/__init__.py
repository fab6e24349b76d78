"""lstm_fused: a fused LSTM for PyTorch, a drop-in for torch.nn.LSTM."""
from . import ops  # noqa: F401  (loads the kernels and registers the ops)
from .modules import LSTM
from .cell import LSTMCell

__all__ = ["LSTM", "ops", "LSTMCell"]
__version__ = "0.1.0"
