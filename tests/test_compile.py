"""torch.compile (fullgraph, dynamic sequence length) and torch.export of a
model embedding -> lstm_fused.LSTM -> linear."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or seen shapes from other tests
    yield
    torch._dynamo.reset()


class Tagger(nn.Module):
    def __init__(self, lstm_cls=lstm_fused.LSTM):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = lstm_cls(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(12, 3)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.out(y)


def model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return Tagger().to(device)


def tokens(length, device="cpu", batch=3, seed=1):
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, 20, (batch, length), generator=g).to(device)


def outputs_and_grads(m, t):
    m.zero_grad()
    y = m(t)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach()] + [p.grad.clone() for p in m.parameters()]


def test_no_graph_breaks():
    explained = torch._dynamo.explain(model())(tokens(5))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert sum(t.startswith("lstm_fused.layer_forward") for t in targets) == 4  # 2 layers x 2 dirs
    # nn.LSTM breaks the graph unless dynamo's allow_rnn is set; importing
    # lstm_fused sets it.
    assert torch._dynamo.config.allow_rnn


@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_matches_eager(device):
    m = model(device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    t = tokens(6, device)
    for a, b in zip(outputs_and_grads(compiled, t), outputs_and_grads(m, t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_backward_uses_fused_ops():
    """The traced forward and backward graphs hold our two ops."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = []

    def keep(gm, _):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model(), fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    compiled(tokens(4)).sum().backward()
    assert len(graphs) == 2
    assert "lstm_fused.layer_forward.default" in graphs[0]
    assert "lstm_fused.layer_backward.default" in graphs[1]


def test_training_step():
    m, ref = model(), model()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    step = torch.compile(m, fullgraph=True, backend="aot_eager")
    target = torch.randint(0, 3, (3, 5), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(3):
        for net, o in ((step, opt), (ref, opt_ref)):
            o.zero_grad()
            loss = nn.functional.cross_entropy(net(tokens(5)).flatten(0, 1), target.flatten())
            loss.backward()
            o.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_dynamic_length_compiles_once():
    counter = CompileCounterWithBackend("aot_eager")
    m = model()
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    for length in (4, 7, 11):
        t = tokens(length)
        torch._dynamo.mark_dynamic(t, 1)
        torch.testing.assert_close(compiled(t), m(t), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_automatic_dynamic_length():
    """Without marks: one recompile (to a dynamic length), then none."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model(), fullgraph=True, backend=counter)
    for length in (4, 7, 11, 13):
        compiled(tokens(length))
    assert counter.frame_count == 2


def test_packed_sequence():
    """A PackedSequence through a compiled LSTM: same results. Its batch size
    is data (batch_sizes[0]); fullgraph needs capture_scalar_outputs."""
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(4, 5, bidirectional=True)

    def f(packed):
        out, (h, c) = lstm(packed)
        return out.data, h, c

    x = torch.randn(6, 3, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    expected = f(packed)
    for a, b in zip(torch.compile(f, backend="aot_eager")(packed), expected):
        torch.testing.assert_close(a, b)  # one graph break at batch_sizes[0]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(packed)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_inductor():
    """The default backend (inductor), forward and backward."""
    m = model()
    compiled = torch.compile(m, fullgraph=True)
    t = tokens(5)
    for a, b in zip(outputs_and_grads(compiled, t), outputs_and_grads(m, t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_export_save_load(tmp_path):
    m = model().eval()
    length = torch.export.Dim("length", min=2)
    program = torch.export.export(m, (tokens(5),), dynamic_shapes={"tokens": {1: length}})
    targets = {str(n.target) for n in program.graph.nodes}
    assert "lstm_fused.layer_forward.default" in targets
    assert not any("aten.lstm" in t for t in targets)
    t = tokens(9)
    torch.testing.assert_close(program.module()(t), m(t))

    path = tmp_path / "tagger.pt2"
    torch.export.save(program, path)
    torch.save({"tokens": t, "expected": m(t).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import lstm_fused
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        got = program.module()(io["tokens"])
        torch.testing.assert_close(got, io["expected"])
        print("same")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=240, env=env)
    assert run.returncode == 0 and "same" in run.stdout, run.stderr[-3000:]
