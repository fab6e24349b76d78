"""lstm_fused.LSTM: torch.nn.LSTM with its forward run by the fused ops."""
import copy
import importlib.abc
import importlib.util
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import ops

_HALF_TYPES = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float64) + _HALF_TYPES
# Device types whose kernels take float16/bfloat16 as they are; elsewhere (the
# CPU) they run in float32 and are cast back. (tests/emu.py adds "cpu" in a
# process whose CPU ops are the emulated CUDA ones.)
_HALF_NATIVE = {"cuda"}


# Device types the extension was built with kernels for; fixed once it is
# loaded, so computed here (torch.compile cannot trace the dispatcher query).
_KERNEL_DEVICES = frozenset(
    d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", key))


def _allow_rnn_in_dynamo():
    """torch.compile refuses every nn.LSTM subclass unless dynamo's allow_rnn
    is set (torch.export sets it); ours is ops it can trace, so set it, once
    dynamo is loaded: importing it here would slow `import lstm_fused` ~1.5 s."""
    name = "torch._dynamo.config"
    if name in sys.modules:
        sys.modules[name].allow_rnn = True
        return

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.allow_rnn = True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())


_allow_rnn_in_dynamo()


def _has_kernel(device_type):
    return device_type in _KERNEL_DEVICES


def as_torch(module):
    """lstm_fused.LSTM or LSTMCell as its torch.nn class, for torch code that
    wants that exact class (torch.jit.script, the quantized modules'
    from_float): a shallow copy, on the same parameters."""
    plain = copy.copy(module)
    plain.__class__ = nn.LSTM if isinstance(module, nn.LSTM) else nn.LSTMCell
    return plain


def _autocast_dtype(x):
    """The dtype float32 input runs in under autocast, as in nn.LSTM (whose
    cuDNN and oneDNN paths cast to the autocast dtype), or None."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class LSTM(nn.LSTM):
    """Drop-in replacement for :class:`torch.nn.LSTM`.

    Same constructor, parameters, state_dict keys, inputs, outputs and errors;
    the forward pass (and its backward) runs lstm_fused's fused kernels.
    On CPU, float16/bfloat16 run in float32 and are cast back.
    """

    def __prepare_scriptable__(self):
        # torch.jit.script compiles nn.LSTM's forward; ours is not TorchScript.
        return as_torch(self)

    def forward(self, input, hx=None):  # noqa: C901  (mirrors nn.LSTM.forward)
        mode = ops.export_mode()
        if mode == "torch" or (mode == "onnx" and isinstance(input, PackedSequence)):
            # nn.LSTM's graph (aten::lstm), as the exporters know it.
            return super().forward(input, hx)
        orig_input, orig_hx = input, hx
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = None
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if (isinstance(hx, (tuple, list)) and len(hx) == 2
                    and all(isinstance(h, torch.Tensor) for h in hx)):
                # nn.LSTM checks no hx here; its kernels give odd errors and, for
                # some shapes, crash (torch 2.13: a 4-D c0). Check as for padded input.
                self.check_hidden_size(hx[0], self.get_expected_hidden_size(input, batch_sizes),
                                       "Expected hidden[0] size {}, got {}")
                self.check_hidden_size(hx[1], self.get_expected_cell_size(input, batch_sizes),
                                       "Expected hidden[1] size {}, got {}")
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
            if hx is not None:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should also be 3-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should also be 2-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx is None:
            shape = (self.num_layers * num_directions, max_batch_size)
            hx = (torch.zeros(*shape, real_hidden_size, dtype=input.dtype, device=input.device),
                  torch.zeros(*shape, self.hidden_size, dtype=input.dtype, device=input.device))
        if batch_sizes is None:
            self.check_forward_args(input, hx, batch_sizes)
        if not self._fits(input, hx, batch_sizes):
            # nn.LSTM's kernels refuse this (or, for an empty batch, return
            # empty outputs): let it raise its own error, or return its result.
            return super().forward(orig_input, orig_hx)
        hx = self.permute_hidden(hx, sorted_indices)

        if not _has_kernel(input.device.type) or input.dtype not in _DTYPES:
            warnings.warn(f"lstm_fused has no kernels for {input.dtype} on "
                          f"{input.device.type}; running torch.nn.LSTM instead", stacklevel=2)
            return super().forward(orig_input, orig_hx)

        if batch_sizes is None:
            if self.batch_first:
                input = input.transpose(0, 1)
            steps, batch = input.shape[0], input.shape[1]
            output, h_n, c_n = self._run(input.reshape(steps * batch, -1), hx, None)
            output = output.view(steps, batch, -1)
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(batch_dim)
                return output, (h_n.squeeze(1), c_n.squeeze(1))
            return output, (h_n, c_n)
        output, h_n, c_n = self._run(input, hx, batch_sizes)
        packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return packed, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _fits(self, input, hx, batch_sizes):
        """Whether the kernels can run what passed the Python checks: hx a
        pair; input, hx and weights of one dtype and device; a non-empty input;
        the input width of a PackedSequence. (The op checks batch_sizes.)"""
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2
                and all(isinstance(h, torch.Tensor) for h in hx)
                and isinstance(input, torch.Tensor)):
            return False
        dtype, device = input.dtype, input.device
        for t in (*hx, *self._weights()):
            if t is not None and (t.dtype != dtype or t.device != device):
                return False
        if batch_sizes is None:
            return input.numel() > 0  # nn.LSTM: error for T = 0, empty output for B = 0
        return input.dim() != 2 or input.size(-1) == self.input_size

    def _weights(self):
        """Every weight in nn.LSTM's flat order, the ones nn.LSTM would use:
        as nn.LSTM.forward does, the flat list is brought up to date first
        when any attribute changed (a parameter reassigned or moved, one
        substituted by torch.func.functional_call, a parametrized or plain
        tensor set in its place). Traced (compile, export), the same list is
        read without writing it back to the module, which export would flag."""
        if torch.compiler.is_compiling():
            if self._weights_have_changed():
                return [getattr(self, name) for name in self._flat_weights_names]
            return self._flat_weights
        self._update_flat_weights()
        return self._flat_weights

    def _layer_weights(self, weights, index):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of layer*directions + direction."""
        per = len(weights) // (self.num_layers * (2 if self.bidirectional else 1))
        w = weights[index * per:(index + 1) * per]
        b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
        w_hr = w[-1] if self.proj_size > 0 else None
        return w[0], w[1], b_ih, b_hh, w_hr

    def _run(self, x, hx, batch_sizes):
        """x: [rows, input_size] (steps of the batch, or packed rows)."""
        h0, c0 = hx
        cast = _autocast_dtype(x)
        if cast is not None:
            x, h0, c0 = x.to(cast), h0.to(cast), c0.to(cast)
        out_dtype = x.dtype
        upcast = out_dtype in _HALF_TYPES and x.device.type not in _HALF_NATIVE
        if upcast:
            x, h0, c0 = x.float(), h0.float(), c0.float()
        directions = 2 if self.bidirectional else 1
        all_weights = self._weights()
        h_n, c_n = [], []
        def weights_of(index):
            weights = self._layer_weights(all_weights, index)
            if cast is not None:
                weights = [w.to(cast) if w is not None else None for w in weights]
            if upcast:
                weights = [w.float() if w is not None else None for w in weights]
            return weights
        pairs = directions == 2 and ops.pairs(x)
        for layer in range(self.num_layers):
            first = layer * directions
            if pairs:  # both directions in one call
                x, h, c = ops.bilayer(x, h0[first:first + 2], c0[first:first + 2],
                                      weights_of(first), weights_of(first + 1),
                                      batch_sizes=batch_sizes)
                h_n += [h[0], h[1]]
                c_n += [c[0], c[1]]
            else:
                outputs = []
                for direction in range(directions):
                    y, h, c = ops.layer(x, h0[first + direction], c0[first + direction],
                                        *weights_of(first + direction),
                                        batch_sizes=batch_sizes, reverse=direction == 1)
                    outputs.append(y)
                    h_n.append(h)
                    c_n.append(c)
                x = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if upcast:
            x, h_n, c_n = x.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)
        return x, h_n, c_n
