"""The LSTM layer in plain differentiable torch ops, step by step.

Same arguments and results (y, h_n, c_n) as `ops.layer`. Slow; it serves the
double backward (autograd differentiates it; see ops._backward) and tests.
"""
import torch
import torch.nn.functional as F


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
    gates_x = F.linear(x, w_ih, b_ih)
    if b_hh is not None:
        gates_x = gates_x + b_hh
    # h and c hold all rows of the batch; a row's state changes only while
    # it is active (the first sizes[t] rows at step t), so it ends as h_n.
    h, c = h0, c0
    ys = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, r = sizes[t], starts[t]
        gates = gates_x[r:r + n] + F.linear(h[:n], w_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c_t = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
        h_t = torch.sigmoid(o) * torch.tanh(c_t)
        if w_hr is not None:
            h_t = F.linear(h_t, w_hr)
        ys[t] = h_t
        h = torch.cat([h_t, h[n:]])
        c = torch.cat([c_t, c[n:]])
    return torch.cat(ys), h, c
