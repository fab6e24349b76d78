"""Every way a module's weights can be substituted or re-pointed computes with
the weights nn.LSTM would use: outputs and gradients equal nn.LSTM's under
the same change (float64)."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from helpers import compare, pair, run

DT = torch.float64
CFGS = [dict(num_layers=2, bidirectional=True), dict(proj_size=2, num_layers=2),
        dict(bias=False, batch_first=True)]
cfg_id = lambda c: ",".join(f"{k}={v}" for k, v in c.items())  # noqa: E731


def new_params(module, seed=7, names=None):
    """Random tensors (requiring grad) for the named parameters of module."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).requires_grad_()
            for k, v in module.named_parameters() if names is None or k in names}


def call_with(call, module, params, x, hx=None, lengths=None):
    """Forward through call(module, params, args) and backward of a loss on
    every output: (outputs..., grad x, grads of params in order). The module's
    own parameters must get no gradient."""
    x = x.detach().clone().requires_grad_()
    inp = x if lengths is None else pack_padded_sequence(
        x, lengths, batch_first=module.batch_first, enforce_sorted=False)
    out, (h, c) = call(module, params, (inp,) if hx is None else (inp, hx))
    data = out.data if lengths is not None else out
    loss = data.square().sum() + (h * 1.5).sum() + c.sin().sum()
    grads = torch.autograd.grad(loss, [x, *params.values()])
    assert all(p.grad is None for p in module.parameters())
    return [data.detach(), h.detach(), c.detach(), *grads]


def inputs(cfg, T=5, B=3, I=4):
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if cfg.get("batch_first") else (T, B, I)
    return torch.randn(shape, generator=g, dtype=DT)


@pytest.mark.parametrize("cfg", CFGS, ids=cfg_id)
@pytest.mark.parametrize("packed", [False, True])
def test_functional_call_uses_the_given_parameters(cfg, packed):
    ref, ours = pair(4, 5, DT, **cfg)
    params = new_params(ref)
    x = inputs(cfg)
    lengths = [5, 2, 4] if packed else None
    expected = call_with(functional_call, ref, params, x, lengths=lengths)
    got = call_with(functional_call, ours, params, x, lengths=lengths)
    compare(expected, got, DT)
    # Far from what the module's own weights give: the test can fail.
    own = ours(x if lengths is None else pack_padded_sequence(
        x, lengths, batch_first=ours.batch_first, enforce_sorted=False))[1][0]
    assert (own - got[1]).abs().max() > 0.1
    # And afterwards the module's own weights again.
    compare(run(ref, x, None), run(ours, x, None), DT)


def test_functional_call_of_a_model_some_parameters():
    """A model holding the LSTM; only some of its weights substituted, the
    others the module's own (functional_call's strict=False)."""
    def model(cls):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4, dtype=DT),
                             cls(4, 5, num_layers=2, bidirectional=True, dtype=DT))
    ref, ours = model(nn.LSTM), model(lstm_fused.LSTM)
    ours.load_state_dict(ref.state_dict())
    names = {"1.weight_hh_l0", "1.bias_ih_l1_reverse", "1.weight_ih_l1"}
    params = new_params(ref, names=names)
    assert len(params) == 3
    x = torch.randn(6, 2, 3, dtype=DT)
    compare(call_with(functional_call, ref, params, x),
            call_with(functional_call, ours, params, x), DT)


def test_stateless_functional_call():
    call = torch.nn.utils.stateless.functional_call
    ref, ours = pair(4, 5, DT, num_layers=2, proj_size=3)
    params = new_params(ref, seed=3)
    x = inputs({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for torch.func's
        compare(call_with(call, ref, params, x), call_with(call, ours, params, x), DT)


def test_functional_call_with_hx():
    ref, ours = pair(4, 5, DT, bidirectional=True)
    params = new_params(ref, seed=5)
    x = inputs({})
    hx = (torch.randn(2, 3, 5, dtype=DT), torch.randn(2, 3, 5, dtype=DT))
    compare(call_with(functional_call, ref, params, x, hx),
            call_with(functional_call, ours, params, x, hx), DT)


def test_lstm_cell_functional_call():
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 5, dtype=DT)
    ours = lstm_fused.LSTMCell(4, 5, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    params = new_params(ref)
    x = torch.randn(3, 4, dtype=DT)

    def go(m):
        h, c = functional_call(m, params, (x,))
        return [h, c, *torch.autograd.grad((h.square() + c).sum(), list(params.values()))]
    compare(go(ref), go(ours), DT)


def test_plain_tensor_set_in_place_of_a_parameter():
    """fastai's WeightDropout (AWD-LSTM): the parameter removed, a raw copy
    registered elsewhere and a plain tensor computed from it set on the LSTM
    before every call. The gradient flows to the raw copy."""
    def wrap(m):
        raw = nn.Parameter(m.weight_hh_l0.detach().clone())
        del m._parameters["weight_hh_l0"]
        return raw

    ref, ours = pair(4, 5, DT, num_layers=2)
    raws = [wrap(ref), wrap(ours)]
    x = inputs({})
    results = []
    for m, raw in zip((ref, ours), raws):
        for seed in (0, 1):  # a new tensor each call, as with weight dropout
            g = torch.Generator().manual_seed(seed)
            mask = (torch.rand(raw.shape, generator=g) > 0.3).to(DT) / 0.7
            setattr(m, "weight_hh_l0", raw * mask)
            out, (h, c) = m(x)
            results.append([out, h, c, torch.autograd.grad(out.sum() + c.sum(), raw)[0]])
    for expected, got in zip(results[:2], results[2:]):
        compare(expected, got, DT)


def test_flat_weights_list_changed_in_place():
    """A weight put straight into the private _flat_weights list is used by
    nn.LSTM (its flat list is what it computes with): by us too."""
    ref, ours = pair(4, 5, DT)
    w = torch.randn(20, 5, dtype=DT)
    for m in (ref, ours):
        m(inputs({}))
        m._flat_weights[1] = w.clone()
    x = inputs({})
    compare([t for t in ref(x)[1]], [t for t in ours(x)[1]], DT)


def test_parameter_replaced_then_flatten_parameters():
    ref, ours = pair(4, 5, DT, num_layers=2)
    x = inputs({})
    for m in (ref, ours):
        m(x)
        m.weight_ih_l1 = nn.Parameter(torch.full_like(m.weight_ih_l1, 0.1))
        m.flatten_parameters()
    compare(run(ref, x, None), run(ours, x, None), DT)


def test_data_assignment_and_in_place_update():
    ref, ours = pair(4, 5, DT, bidirectional=True)
    x = inputs({})
    new = torch.randn_like(ref.weight_hh_l0_reverse)
    for m in (ref, ours):
        m(x)
        m.weight_hh_l0_reverse.data = new.clone()
        with torch.no_grad():
            m.bias_ih_l0.mul_(3.0)
    compare(run(ref, x, None), run(ours, x, None), DT)


def test_dtype_conversion():
    ref, ours = pair(4, 5, torch.float32, num_layers=2, proj_size=2)
    x = inputs({})
    for m in (ref, ours):
        m(x.float())
    ref, ours = ref.to(DT), ours.double()
    compare(run(ref, x, None), run(ours, x, None), DT)


def test_swap_tensors_fails_as_for_nn_lstm():
    """nn.LSTM keeps weak references to its weights, so torch.utils.swap_tensors
    refuses them: the same error for us."""
    ref, ours = pair(4, 5, torch.float32)
    for m in (ref, ours):
        with pytest.raises(RuntimeError, match="Cannot swap t1 because it has weakref"):
            torch.utils.swap_tensors(m.weight_ih_l0, nn.Parameter(torch.randn(20, 4)))


def test_conversion_with_swap_on():
    """.double() with torch's swap-on-conversion: RNNBase._apply drops its
    weak references first, then the parameters are swapped in place."""
    ref, ours = pair(4, 5, torch.float32, num_layers=2, bidirectional=True)
    x = inputs({})
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for m in (ref, ours):
            m(x.float())
            m.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert ours.weight_hh_l0.dtype == DT
    compare(run(ref, x, None), run(ours, x, None), DT)


class _Scaled(nn.Module):
    """A parametrization: the weight times a learnable scalar."""
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.7, dtype=DT))

    def forward(self, w):
        return w * self.scale


@pytest.mark.parametrize("cfg", CFGS, ids=cfg_id)
def test_parametrizations(cfg):
    """torch.nn.utils.parametrize on recurrent and input weights (a learnable
    scale; weight norm): computed from the parametrization at every call,
    gradients reach its parameters."""
    from torch.nn.utils import parametrizations, parametrize
    ref, ours = pair(4, 5, DT, **cfg)
    x = inputs(cfg)
    found = []
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh_l0", _Scaled())
        parametrizations.weight_norm(m, "weight_ih_l0")
        m(x)  # the flat weight list is taken before the parametrization changes
        with torch.no_grad():
            m.parametrizations.weight_hh_l0[0].scale.fill_(0.4)
        out, (h, c) = m(x)
        (out.square().sum() + h.sum() + c.sin().sum()).backward()
        found.append([out.detach(), h.detach(), c.detach()] +
                     [p.grad.clone() for p in m.parameters()])
    assert len(found[1]) == len(found[0]) > 3
    compare(found[0], found[1], DT)
    # The parametrized weight changed the result: the test can fail.
    plain = pair(4, 5, DT, **cfg)[1]
    assert (plain(x)[1][0] - found[1][1]).abs().max() > 1e-3


def test_load_state_dict_with_assign():
    """load_state_dict(assign=True) puts the given tensors in place of the
    parameters: the next call computes with them."""
    ref, ours = pair(4, 5, DT, num_layers=2, bidirectional=True, proj_size=3)
    x = inputs({})
    g = torch.Generator().manual_seed(11)
    state = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in ref.state_dict().items()}
    for m in (ref, ours):
        m(x)
        m.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    assert torch.equal(ours.weight_hh_l1_reverse, state["weight_hh_l1_reverse"])
    compare(run(ref, x, None), run(ours, x, None), DT)
