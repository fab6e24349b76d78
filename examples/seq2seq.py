"""Sequence to sequence with lstm_fused: numbers written as digits -> the same
number in English words ("40712" -> "forty thousand seven hundred twelve"),
a transduction generated offline in which order matters (the same digits in
another order are another number).

Encoder: a bidirectional lstm_fused.LSTM over the digits (packed). Decoder: a
stack of lstm_fused.LSTMCell run step by step, started from the encoder's
final states, with Luong attention and input feeding (or without attention:
--no-attention). Trained with teacher forcing; evaluated by greedy decoding,
exact match on numbers never seen in training.

    python examples/seq2seq.py                 # both implementations, a few minutes on 2 cores
    python examples/seq2seq.py --impl fused --device cuda

`--impl torch` runs the same with torch.nn.LSTM and torch.nn.LSTMCell; `--impl
both` runs both (same seed, same initial weights). The state_dict is the same
for both, so a checkpoint of one loads into the other.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    def tqdm(it, **_):
        return it

IMPLS = {"fused": (lstm_fused.LSTM, lstm_fused.LSTMCell), "torch": (nn.LSTM, nn.LSTMCell)}

# ---------------------------------------------------------------- the task

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB = ["<pad>"] + list("0123456789")
TGT_VOCAB = ["<pad>", "<s>", "</s>"] + sorted(set(ONES + TENS[2:] + ["hundred", "thousand"]))
TGT_INDEX = {w: i for i, w in enumerate(TGT_VOCAB)}


def to_words(n):
    """English words of 0 <= n < 10**6."""
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [ONES[n // 100], "hundred"] + (to_words(n % 100) if n % 100 else [])
    return to_words(n // 1000) + ["thousand"] + (to_words(n % 1000) if n % 1000 else [])


def make_splits(sizes, seed=0, max_digits=6):
    """Disjoint sets of numbers, as (digit ids, word ids + EOS); the number of
    digits is uniform, so short numbers are as common as long ones."""
    rng = random.Random(seed)
    seen, numbers = set(), []
    while len(numbers) < sum(sizes.values()):
        d = rng.randint(1, max_digits)
        n = rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [([int(ch) + 1 for ch in str(n)], [TGT_INDEX[w] for w in to_words(n)] + [EOS])
                     for n in numbers[start:start + size]]
        start += size
    return out


def collate(batch, device):
    """Padded sources and their lengths, decoder inputs (BOS + target) and targets."""
    src = nn.utils.rnn.pad_sequence([torch.tensor(s) for s, _ in batch], batch_first=True)
    lengths = torch.tensor([len(s) for s, _ in batch])
    tgt = nn.utils.rnn.pad_sequence([torch.tensor(t) for _, t in batch], batch_first=True)
    tgt_in = F.pad(tgt[:, :-1], (1, 0), value=BOS)
    return src.to(device), lengths, tgt_in.to(device), tgt.to(device)


# ---------------------------------------------------------------- the model


class Seq2Seq(nn.Module):
    def __init__(self, emb=64, hidden=128, layers=2, attention=True, impl="fused"):
        super().__init__()
        lstm, cell = IMPLS[impl]
        self.attention = attention
        self.src_emb = nn.Embedding(len(SRC_VOCAB), emb, padding_idx=PAD)
        # hidden // 2 per direction: the two directions together start the decoder.
        self.encoder = lstm(emb, hidden // 2, num_layers=layers, bidirectional=True,
                            batch_first=True)
        self.tgt_emb = nn.Embedding(len(TGT_VOCAB), emb, padding_idx=PAD)
        first = emb + (hidden if attention else 0)  # input feeding: the last attentional state
        self.cells = nn.ModuleList(cell(first if k == 0 else hidden, hidden) for k in range(layers))
        if attention:
            self.score = nn.Linear(hidden, hidden, bias=False)  # Luong "general"
            self.combine = nn.Linear(2 * hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, len(TGT_VOCAB))

    def encode(self, src, lengths):
        """Encoder outputs [B, S, hidden], the padding mask and per layer the
        decoder's initial (h, c): both directions of that encoder layer."""
        packed = pack_padded_sequence(self.src_emb(src), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, (h_n, c_n) = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        B = src.shape[0]

        def join(s):  # [layers * 2, B, hidden/2] -> per layer [B, hidden]
            return s.view(-1, 2, B, s.shape[-1]).transpose(1, 2).reshape(-1, B, 2 * s.shape[-1])

        state = list(zip(join(h_n), join(c_n)))
        feed = out.new_zeros(B, out.shape[-1]) if self.attention else None
        return out, src != PAD, state, feed

    def step(self, y, memory, mask, state, feed):
        """One decoder step from the previous tokens y [B]: logits, new state and feed."""
        x = self.tgt_emb(y)
        if self.attention:
            x = torch.cat([x, feed], dim=1)
        new = []
        for cell, hc in zip(self.cells, state):
            hc = cell(x, hc)
            new.append(hc)
            x = hc[0]
        if self.attention:
            scores = torch.bmm(memory, self.score(x).unsqueeze(2)).squeeze(2)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)
            context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
            x = feed = torch.tanh(self.combine(torch.cat([context, x], dim=1)))
        return self.out(x), new, feed

    def forward(self, src, lengths, tgt_in):
        """Teacher forcing: logits [B, T, vocab] for the decoder inputs tgt_in."""
        memory, mask, state, feed = self.encode(src, lengths)
        logits = []
        for t in range(tgt_in.shape[1]):
            out, state, feed = self.step(tgt_in[:, t], memory, mask, state, feed)
            logits.append(out)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy(self, src, lengths, max_len=16):
        """Token ids [B, <= max_len], each row up to and including its EOS."""
        memory, mask, state, feed = self.encode(src, lengths)
        y = src.new_full((src.shape[0],), BOS)
        out, done = [], torch.zeros_like(y, dtype=torch.bool)
        for _ in range(max_len):
            logits, state, feed = self.step(y, memory, mask, state, feed)
            y = logits.argmax(1).masked_fill(done, PAD)
            out.append(y)
            done |= y == EOS
            if bool(done.all()):
                break
        return torch.stack(out, dim=1)


def build_model(cfg, impl):
    return Seq2Seq(cfg["emb"], cfg["hidden"], cfg["layers"], cfg["attention"], impl)


def load_checkpoint(path, impl="torch", device="cpu"):
    """A saved model on either implementation (the state_dict is the same)."""
    ckpt = torch.load(path, map_location=device)
    model = build_model(ckpt["config"], impl).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def decode_words(ids):
    words = []
    for i in ids:
        if i in (EOS, PAD):
            break
        words.append(TGT_VOCAB[i])
    return " ".join(words)


# ---------------------------------------------------------------- training


def exact_match(model, data, batch_size, device):
    model.eval()
    hits = 0
    for s in range(0, len(data), batch_size):
        batch = data[s:s + batch_size]
        src, lengths, _, _ = collate(batch, device)
        pred = model.greedy(src, lengths).tolist()
        hits += sum(decode_words(p) == decode_words(t) for p, (_, t) in zip(pred, batch))
    return hits / len(data)


def train(model, splits, args, name, ckpt):
    """Teacher forcing with AdamW, a one-cycle LR schedule and gradient
    clipping; keeps the checkpoint with the best validation exact match. A
    generator: it yields after every epoch (see `alternate`) and returns the
    history."""
    device = args.device
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = math.ceil(len(splits["train"]) / args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps * args.epochs,
                                                pct_start=0.2)
    hist = {k: [] for k in ("train_loss", "val_exact", "epoch_s", "step_loss")}
    best = -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = list(range(len(splits["train"])))
        rng.shuffle(order)
        total = n = 0
        start = time.perf_counter()
        bar = tqdm(range(steps), desc=f"{name} epoch {epoch}", leave=False, disable=args.quiet)
        for k in bar:
            batch = [splits["train"][i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
            src, lengths, tgt_in, tgt = collate(batch, device)
            logits = model(src, lengths, tgt_in)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            hist["step_loss"].append(loss.item())
            total, n = total + loss.item(), n + 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        val = exact_match(model, splits["val"], args.batch_size, device)
        hist["train_loss"].append(total / n)
        hist["val_exact"].append(val)
        hist["epoch_s"].append(seconds)
        log(args, f"{name} epoch {epoch}: train loss {total / n:.4f}  val exact match "
            f"{val:.4f}  ({seconds:.1f} s)")
        yield
        if val > best:
            best = val
            torch.save(dict(ckpt, model=model.state_dict()), ckpt["path"])
    model.load_state_dict(torch.load(ckpt["path"], map_location=device)["model"])
    return hist


def alternate(runs):
    """Runs the `train` generators one epoch each in turn, so that their epoch
    times see the same machine load (training draws no random numbers from
    torch: each run is as if alone)."""
    out = {}
    while len(out) < len(runs):
        for name, run in runs.items():
            if name not in out:
                try:
                    next(run)
                except StopIteration as stop:
                    out[name] = stop.value
    return out


def log(args, msg):
    if not args.quiet:
        print(msg, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--max-digits", type=int, default=6, help="numbers below 10**max_digits")
    p.add_argument("--emb", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--impl", choices=["fused", "torch", "both"], default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "seq2seq"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(dict(train=args.train_size, val=args.val_size, test=args.test_size),
                         args.seed, args.max_digits)
    cfg = dict(emb=args.emb, hidden=args.hidden, layers=args.layers,
               attention=not args.no_attention)
    log(args, f"numbers below 10^{args.max_digits}: train/val/test {args.train_size}/"
        f"{args.val_size}/{args.test_size}  {cfg}  device {args.device}  "
        f"threads {torch.get_num_threads()}")
    models, runs = {}, {}
    for impl in (["fused", "torch"] if args.impl == "both" else [args.impl]):
        torch.manual_seed(args.seed)  # the same initial weights for both
        models[impl] = build_model(cfg, impl).to(args.device)
        runs[impl] = train(models[impl], splits, args, impl,
                           dict(path=str(out / f"{impl}.pt"), config=cfg))
    results = {}
    src, lengths, _, _ = collate(splits["test"][:3], args.device)
    for impl, hist in alternate(runs).items():
        model = models[impl]
        acc = exact_match(model, splits["test"], args.batch_size, args.device)
        epoch_s = sum(hist["epoch_s"]) / len(hist["epoch_s"])
        results[impl] = dict(history=hist, test_exact=acc, epoch_s=epoch_s,
                             checkpoint=str(out / f"{impl}.pt"))
        for (s, _), p in zip(splits["test"][:3], model.greedy(src, lengths).tolist()):
            log(args, f"  {''.join(SRC_VOCAB[i] for i in s):>7} -> {decode_words(p)}")
        log(args, f"{impl}: test exact match {acc:.4f}  mean train time per epoch {epoch_s:.2f} s")
    if len(results) == 2:
        f, t = results["fused"], results["torch"]
        log(args, f"fused vs torch: test exact match {f['test_exact']:.4f} vs "
            f"{t['test_exact']:.4f}; time per epoch {f['epoch_s']:.2f} s vs {t['epoch_s']:.2f} s "
            f"({t['epoch_s'] / f['epoch_s']:.2f}x)")
    with open(out / "results.json", "w") as fh:
        json.dump(dict(args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                       results=results), fh, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
