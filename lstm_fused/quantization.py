"""torch.ao.quantization's eager mode treats lstm_fused.LSTM and LSTMCell as the
torch.nn modules they subclass: quantize_dynamic gives them the dynamic
quantized modules nn.LSTM and nn.LSTMCell get, made by those modules' own
from_float; static quantization (prepare, convert) gives ours nn.LSTM's.

torch matches modules by exact type, in two places: the mappings (we add ours)
and the qconfig lookup, whose default for quantize_dynamic is a dict built
inside that function. So the qconfig propagation that quantize_dynamic (and
prepare) call is wrapped: where its dict names nn.LSTM or nn.LSTMCell and not
our subclass, ours gets the same qconfig. torch.ao.quantization is imported by
`import torch`: this costs no import time (about 1 ms).
"""
import functools
import importlib

from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import quantization_mappings

from .cell import LSTMCell
from .modules import LSTM, as_torch

_BASES = {LSTM: nn.LSTM, LSTMCell: nn.LSTMCell}


class _DynamicLSTM(nnqd.LSTM):
    """Mapping entry for lstm_fused.LSTM: from_float returns nn.LSTM's."""

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        return nnqd.LSTM.from_float(as_torch(mod), use_precomputed_fake_quant)


class _DynamicLSTMCell(nnqd.LSTMCell):
    """Mapping entry for lstm_fused.LSTMCell: from_float returns nn.LSTMCell's."""

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        return nnqd.LSTMCell.from_float(as_torch(mod), use_precomputed_fake_quant)


def _with_ours(qconfig_dict):
    """qconfig_dict, with our classes given their base's entry if it has
    one and none of theirs."""
    extra = {ours: qconfig_dict[base] for ours, base in _BASES.items()
             if base in qconfig_dict and ours not in qconfig_dict}
    return {**qconfig_dict, **extra} if extra else qconfig_dict


def _install():
    mappings = quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS
    mappings.setdefault(LSTM, _DynamicLSTM)
    mappings.setdefault(LSTMCell, _DynamicLSTMCell)
    # Static quantization swaps nn.LSTM for its observed (quantizable) LSTM,
    # whose from_float takes any nn.LSTM.
    quantize = importlib.import_module("torch.ao.quantization.quantize")  # the
    # package's attribute `quantize` is the function of that name
    observed = quantize.get_default_custom_config_dict()["float_to_observed_custom_module_class"]
    observed.setdefault(LSTM, observed[nn.LSTM])
    propagate = getattr(quantize, "propagate_qconfig_", None)
    if propagate is None or getattr(propagate, "_lstm_fused", False):
        return

    @functools.wraps(propagate)
    def propagate_qconfig_(module, qconfig_dict=None, prepare_custom_config_dict=None):
        if qconfig_dict:
            qconfig_dict = _with_ours(qconfig_dict)
        return propagate(module, qconfig_dict, prepare_custom_config_dict)
    propagate_qconfig_._lstm_fused = True
    quantize.propagate_qconfig_ = propagate_qconfig_


_install()
