"""The LSTM layer in plain differentiable torch ops, step by step.

Same arguments and results (y, h_n, c_n) as `ops.layer`. Slow; it serves the
derivatives beyond the first and forward mode (see ops.py), the ONNX export of
a projected layer, and tests.
"""
import torch
import torch.nn.functional as F


def input_gates(x, w_ih, b_ih=None, b_hh=None):
    """The gates' input part of every step: x W_ih^T + b_ih + b_hh."""
    gates = F.linear(x, w_ih, b_ih)
    return gates + b_hh if b_hh is not None else gates


def step(gates, c, w_hr=None):
    """One step of the cell from the gate pre-activations (input and
    recurrent parts summed, [n, 4H]) and c: returns (h, c)."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (F.linear(h, w_hr) if w_hr is not None else h), c


def layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
          reverse=False):
    batch = h0.shape[0]
    if batch_sizes is None:
        sizes = [batch] * (x.shape[0] // batch)
    else:
        sizes = batch_sizes.tolist()
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    gates_x = input_gates(x, w_ih, b_ih, b_hh)
    # h and c hold all rows of the batch; a row's state changes only while
    # it is active (the first sizes[t] rows at step t), so it ends as h_n.
    h, c = h0, c0
    ys = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, r = sizes[t], starts[t]
        h_t, c_t = step(gates_x[r:r + n] + F.linear(h[:n], w_hh), c[:n], w_hr)
        ys[t] = h_t
        h = torch.cat([h_t, h[n:]])
        c = torch.cat([c_t, c[n:]])
    return torch.cat(ys), h, c
