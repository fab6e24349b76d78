"""lstm_fused.LSTMCell: torch.nn.LSTMCell with its step run by the fused op.

One step is `layer_forward` over a sequence of length 1 (x is [B, I]), so
forward and backward are the LSTM's kernels and autograd. Per call the module
does a few shape and dtype comparisons and one op call: no weight copies.
Anything the fast path does not take (bad shapes or dtypes, an empty batch, a
device without kernels) goes to nn.LSTMCell.forward, which raises its own
errors or computes the result.
"""
import torch
from torch import nn

from . import ops
from .modules import _HALF_NATIVE, _HALF_TYPES, _has_kernel, as_torch

class LSTMCell(nn.LSTMCell):
    """Drop-in replacement for :class:`torch.nn.LSTMCell`.

    Same constructor, parameters, state_dict keys, inputs, outputs and errors;
    the step (and its backward) runs lstm_fused's fused kernels. On CPU,
    float16/bfloat16 run in float32 and are cast back.
    """

    def __prepare_scriptable__(self):
        # torch.jit.script compiles nn.LSTMCell's forward; ours is not TorchScript.
        return as_torch(self)

    def forward(self, input, hx=None):
        w_ih = self.weight_ih
        dim = input.dim()
        H = self.hidden_size
        B = input.shape[0] if dim == 2 else 1
        shape = (B, H) if dim == 2 else (H,)
        if ops.export_mode() or not (
                dim in (1, 2) and input.shape[-1] == self.input_size and B > 0
                and input.dtype == w_ih.dtype and input.device == w_ih.device
                and _has_kernel(input.device.type)
                and (hx is None or (len(hx) == 2 and hx[0].shape == shape
                                    and hx[1].shape == shape
                                    and hx[0].dtype == hx[1].dtype == w_ih.dtype
                                    and hx[0].device == hx[1].device == w_ih.device))):
            return super().forward(input, hx)

        x = input if dim == 2 else input.unsqueeze(0)
        if hx is None:
            h = c = x.new_zeros(B, H)
        else:
            h, c = hx if dim == 2 else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weights = (w_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        upcast = x.dtype in _HALF_TYPES and x.device.type not in _HALF_NATIVE
        if upcast:
            x, h, c = x.float(), h.float(), c.float()
            weights = [w.float() if w is not None else None for w in weights]
        _, h, c = ops.layer(x, h, c, *weights)
        if upcast:
            h, c = h.to(input.dtype), c.to(input.dtype)
        if dim == 1:
            return h.squeeze(0), c.squeeze(0)
        return h, c
