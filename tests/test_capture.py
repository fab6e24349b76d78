"""A decoder's step (embedding -> 2-layer lstm_fused.LSTM -> linear, B=64,
H=512) captured in a CUDA graph and by torch.compile(mode="reduce-overhead")
replays what eager gives: the step has no host synchronisation and no CPU
tensors. GPU only (skipped without one); the CPU half runs everywhere."""
import pytest
import torch
from torch import nn

import lstm_fused

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
VOCAB, H, LAYERS, B, STEPS = 100, 512, 2, 64, 6


class Decoder(nn.Module):
    def __init__(self, lstm=lstm_fused.LSTM):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, H)
        self.lstm = lstm(H, H, LAYERS)
        self.head = nn.Linear(H, VOCAB)

    def forward(self, tokens, h, c):
        y, (h, c) = self.lstm(self.emb(tokens).unsqueeze(0), (h, c))
        return self.head(y[0]), h, c


def start(device):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (B,), generator=g).to(device)
    h = torch.randn(LAYERS, B, H, generator=g).to(device)
    c = torch.randn(LAYERS, B, H, generator=g).to(device)
    return tokens, h, c


def eager_decode(model, tokens, h, c):
    """Greedy decoding: STEPS steps, each feeding back its argmax and state."""
    logits = []
    with torch.no_grad():
        for _ in range(STEPS):
            out, h, c = model(tokens, h, c)
            logits.append(out)
            tokens = out.argmax(-1)
    return torch.stack(logits)


def model_on(device):
    torch.manual_seed(0)
    return Decoder().to(device).eval()


def test_decode_step_loop_on_cpu_matches_nn():
    """The same loop on the CPU kernels against torch.nn.LSTM's."""
    ours = model_on("cpu")
    ref = Decoder(nn.LSTM).eval()
    ref.load_state_dict(ours.state_dict())
    a, b = eager_decode(ours, *start("cpu")), eager_decode(ref, *start("cpu"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_graph_replays_eager():
    model = model_on("cuda")
    tokens, h, c = start("cuda")
    expected = eager_decode(model, tokens, h, c)
    # Static inputs; the captured step writes the new state back into them.
    st, sh, sc = tokens.clone(), h.clone(), c.clone()

    def step():
        out, h1, c1 = model(st, sh, sc)
        sh.copy_(h1)
        sc.copy_(c1)
        st.copy_(out.argmax(-1))
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up (cuBLAS handles, workspaces) on a side stream
            step()
    torch.cuda.current_stream().wait_stream(side)
    st.copy_(tokens)
    sh.copy_(h)
    sc.copy_(c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = step()
    st.copy_(tokens)  # capture does not run the step: start again from the same state
    sh.copy_(h)
    sc.copy_(c)
    replayed = []
    for _ in range(STEPS):
        graph.replay()
        replayed.append(static_out.clone())
    torch.testing.assert_close(torch.stack(replayed), expected, rtol=1e-5, atol=1e-5)


@CUDA
def test_compile_reduce_overhead_replays_eager():
    model = model_on("cuda")
    tokens, h, c = start("cuda")
    expected = eager_decode(model, tokens, h, c)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    got = []
    with torch.no_grad():
        for _ in range(STEPS):
            out, h, c = compiled(tokens, h, c)
            out, h, c = out.clone(), h.clone(), c.clone()  # replays reuse output memory
            got.append(out)
            tokens = out.argmax(-1)
    torch.testing.assert_close(torch.stack(got), expected, rtol=1e-5, atol=1e-5)
