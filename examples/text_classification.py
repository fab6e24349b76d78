"""Train a text classifier with lstm_fused: tokens -> embeddings -> bidirectional
2-layer LSTM -> linear head, as most LSTM users do.

Data: a CSV/TSV of (text, label), a folder per label (the IMDB aclImdb layout:
aclImdb/{train,test}/{pos,neg}/*.txt), or, by default, a corpus generated here
(offline, deterministic) in which word order decides the label, so a bag of
words cannot solve it. Optional pretrained embeddings from a GloVe or word2vec
text file.

    python examples/text_classification.py                      # both impls, generated corpus
    python examples/text_classification.py --data aclImdb --embeddings glove.6B.100d.txt
    python examples/text_classification.py --data reviews.tsv --impl fused --device cuda

`--impl torch` runs the same with torch.nn.LSTM; `--impl both` runs both (same
seed, same initial weights) and compares. Writes checkpoints, a learning-curve
plot and results.json to --out.
"""
import argparse
import collections
import csv
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import lstm_fused

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    def tqdm(it, **_):
        return it

PAD, UNK = "<pad>", "<unk>"
IMPLS = {"fused": lstm_fused.LSTM, "torch": nn.LSTM}

# ---------------------------------------------------------------- data


def tokenize(text):
    text = text.lower().replace("<br />", " ")
    return re.findall(r"[\w']+|[^\w\s]", text)


TEXT_COLS = ("text", "sentence", "review", "content", "document")
LABEL_COLS = ("label", "sentiment", "class", "target", "category")


def load_table(path, text_col=None, label_col=None, header="auto"):
    """(text, label) rows of a CSV (or TSV: by the .tsv suffix). The columns are
    found by header names (text/sentence/review..., label/sentiment/class...),
    by --text-col/--label-col (name or index), or are the first two. With
    header "auto", the first row is a header when it holds such a name."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    rows = [r for r in rows if r]
    names = [c.strip().lower() for c in rows[0]]
    has_header = header == "yes" or header == "auto" and (
        any(n in names for n in TEXT_COLS + LABEL_COLS)
        or any(str(c).lower() in names for c in (text_col, label_col) if c is not None))
    if not has_header:
        names = []

    def column(given, candidates, default):
        if given is None:
            return next((names.index(n) for n in candidates if n in names), default)
        if str(given).isdigit():
            return int(given)
        if str(given).lower() not in names:
            raise ValueError(f"{path}: no column {given!r} in the header {names}")
        return names.index(str(given).lower())

    ti, li = column(text_col, TEXT_COLS, 0), column(label_col, LABEL_COLS, 1)
    return [(r[ti], r[li].strip()) for r in rows[1 if has_header else 0:]]


def load_folders(path):
    """(text, label) for every path/<label>/*.txt (aclImdb's 'unsup' skipped)."""
    out = []
    for d in sorted(p for p in Path(path).iterdir() if p.is_dir() and p.name != "unsup"):
        for f in sorted(d.glob("*.txt")):
            out.append((f.read_text(encoding="utf-8", errors="replace"), d.name))
    return out


def load_dataset(path, text_col=None, label_col=None, header="auto"):
    """{'train': rows, 'test': rows or None} from a file or a folder; a folder
    with train/ (and test/) subfolders is the aclImdb layout."""
    path = Path(path)
    if path.is_dir():
        if (path / "train").is_dir():
            test = path / "test"
            return {"train": load_folders(path / "train"),
                    "test": load_folders(test) if test.is_dir() else None}
        return {"train": load_folders(path), "test": None}
    return {"train": load_table(path, text_col, label_col, header), "test": None}


# A generated sentiment corpus in which order decides the label: in every
# contrast form ("A but B", "although A , B", "good , not bad", "not bad but
# great", ...) swapping the two polar parts flips the label and keeps the bag
# of words, so a bag-of-words model is near chance on them.
SUBJECTS = ["the movie", "the film", "the plot", "the acting", "the script", "the story",
            "the cast", "the ending", "the music", "the dialogue", "the pacing", "the director"]
VERBS = ["was", "is", "felt", "seemed", "looked", "turned out"]
POSITIVE = ["good", "great", "excellent", "wonderful", "brilliant", "charming", "moving",
            "clever", "fun", "beautiful", "gripping", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "weak", "bland", "clumsy",
            "tedious", "messy", "silly", "poor"]
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "truly "]
OPENERS = ["", "", "", "honestly , ", "overall , ", "i think ", "to be fair , ", "in the end , "]


def _adj(rng, positive):
    return rng.choice(POSITIVE if positive else NEGATIVE)


def _clause(rng, positive):
    """A clause of the given polarity, negated half of the time."""
    negated = rng.random() < 0.5
    neg = rng.choice(["not ", "never ", "hardly "]) if negated else ""
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {neg}{rng.choice(INTENSIFIERS)}"
            f"{_adj(rng, positive != negated)}")


def make_sentence(rng, positive):
    p, q = positive, not positive
    form = rng.randrange(7)
    if form == 0:
        s = _clause(rng, p)
    elif form == 1:
        s = f"{_clause(rng, q)} but {_clause(rng, p)}"
    elif form == 2:
        s = f"although {_clause(rng, q)} , {_clause(rng, p)}"
    elif form == 3:
        s = f"{_clause(rng, p)} , although {_clause(rng, q)}"
    elif form == 4:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {_adj(rng, p)} , not {_adj(rng, q)}"
    elif form == 5:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} not {_adj(rng, q)} but {_adj(rng, p)}"
    else:
        s = f"i expected it to be {_adj(rng, q)} , and it was {_adj(rng, p)}"
    return rng.choice(OPENERS) + s


def generate_corpus(out_dir, n_train=8000, n_test=2000, seed=0):
    """Writes out_dir/train.csv and test.csv (text,label; no text shared) and
    returns their paths."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        positive = rng.random() < 0.5
        s = make_sentence(rng, positive)
        if s not in seen:
            seen.add(s)
            rows.append((s, "positive" if positive else "negative"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.csv", out_dir / "test.csv"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    return paths


class Vocab:
    def __init__(self, token_lists, min_freq=1, max_size=None):
        counts = collections.Counter(t for toks in token_lists for t in toks)
        words = [w for w, n in counts.most_common(max_size) if n >= min_freq]
        self.itos = [PAD, UNK] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, 1) for t in tokens]


def load_embeddings(path, vocab, dim):
    """A [len(vocab), dim] tensor: rows from a GloVe or word2vec text file
    (word2vec's "count dim" first line is skipped), the rest random."""
    weight = torch.randn(len(vocab), dim) * 0.1
    weight[0] = 0
    found = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            parts = line.rstrip().split(" ")
            if n == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            i = vocab.stoi.get(parts[0])
            if i is not None and i > 1:
                if len(parts) - 1 != dim:
                    raise ValueError(f"{path}: vectors have {len(parts) - 1} values, "
                                     f"--emb-dim is {dim}")
                weight[i] = torch.tensor([float(v) for v in parts[1:]])
                found += 1
    return weight, found


def batches(data, batch_size, shuffle, rng):
    """Lists of (ids, label) with similar lengths together (less padding)."""
    order = list(range(len(data)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * 50
    out = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: len(data[i][0]))
        out += [[data[i] for i in part[b:b + batch_size]]
                for b in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(out)
    return out


def collate(batch, device):
    lengths = torch.tensor([max(1, len(ids)) for ids, _ in batch])
    tokens = pad_sequence([torch.tensor(ids or [0]) for ids, _ in batch], batch_first=True)
    labels = torch.tensor([y for _, y in batch])
    return tokens.to(device), lengths, labels.to(device)


# ---------------------------------------------------------------- models


class Classifier(nn.Module):
    """Embedding -> bidirectional LSTM over packed sequences -> linear head on
    the last layer's final states (forward and backward)."""

    def __init__(self, vocab_size, emb_dim, hidden, classes, layers=2, dropout=0.3,
                 impl="fused"):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=0)
        self.lstm = IMPLS[impl](emb_dim, hidden, num_layers=layers, bidirectional=True,
                                batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens, lengths):
        x = self.dropout(self.embedding(tokens))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(self.dropout(torch.cat([h_n[-2], h_n[-1]], dim=1)))


class BagOfWords(nn.Module):
    """The baseline: mean of the word embeddings -> MLP; no word order."""

    def __init__(self, vocab_size, emb_dim, hidden, classes):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, emb_dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, tokens, lengths):
        return self.mlp(self.embedding(tokens))


def build_model(cfg, impl):
    """The classifier of a checkpoint's config with either LSTM implementation."""
    return Classifier(cfg["vocab_size"], cfg["emb_dim"], cfg["hidden"], cfg["classes"],
                      cfg["layers"], cfg["dropout"], impl)


def load_checkpoint(path, impl="torch", device="cpu"):
    """A saved model on `impl` (the state_dict is the same for both), its
    vocabulary and label names."""
    ckpt = torch.load(path, map_location=device)
    model = build_model(ckpt["config"], impl).to(device)
    model.load_state_dict(ckpt["model"])
    vocab = Vocab([])
    vocab.itos, vocab.stoi = ckpt["itos"], {w: i for i, w in enumerate(ckpt["itos"])}
    return model.eval(), vocab, ckpt["labels"]


# ---------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, data, batch_size, device):
    model.eval()
    loss = correct = 0.0
    for batch in batches(data, batch_size, False, None):
        tokens, lengths, labels = collate(batch, device)
        logits = model(tokens, lengths)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    return loss / len(data), correct / len(data)


def train(model, splits, args, name, ckpt=None):
    """Trains with AdamW, a one-cycle LR schedule, gradient clipping and early
    stopping on validation accuracy (then loss); keeps the best state_dict
    (saved to `ckpt` with its config) and reloads it at the end. A generator:
    it yields after every epoch (see `alternate`) and returns the history."""
    device = args.device
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = math.ceil(len(splits["train"]) / args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps * args.epochs,
                                                pct_start=0.2)
    hist = collections.defaultdict(list)
    best, best_state, bad = (-1.0, 0.0), None, 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        todo = batches(splits["train"], args.batch_size, True, rng)[:steps]
        total = n = 0
        start = time.perf_counter()
        bar = tqdm(todo, desc=f"{name} epoch {epoch}", leave=False, disable=args.quiet)
        for batch in bar:
            tokens, lengths, labels = collate(batch, device)
            loss = F.cross_entropy(model(tokens, lengths), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            hist["step_loss"].append(loss.item())
            total, n = total + loss.item() * len(batch), n + len(batch)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, splits["val"], args.batch_size, device)
        for k, v in dict(train_loss=total / n, val_loss=val_loss, val_acc=val_acc,
                         epoch_s=seconds).items():
            hist[k].append(v)
        log(args, f"{name} epoch {epoch}: train loss {total / n:.4f}  val loss {val_loss:.4f}"
            f"  val acc {val_acc:.4f}  ({seconds:.1f} s)")
        yield
        if (val_acc, -val_loss) > best:  # better accuracy, or as good with less loss
            best, bad = (val_acc, -val_loss), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if ckpt is not None:
                torch.save(dict(ckpt, model=best_state), ckpt["path"])
        else:
            bad += 1
            if bad >= args.patience:
                log(args, f"{name}: early stop (no val improvement in {bad} epochs)")
                break
    model.load_state_dict(best_state)
    return dict(hist)


def alternate(runs, seed):
    """Runs the `train` generators one epoch each in turn, so that their epoch
    times see the same machine load; each keeps its own random stream
    (dropout), as if it ran alone after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    start = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
    states, out = dict.fromkeys(runs, start), {}
    while len(out) < len(runs):
        for name, run in runs.items():
            if name in out:
                continue
            torch.set_rng_state(states[name][0])
            if cuda:
                torch.cuda.set_rng_state_all(states[name][1])
            try:
                next(run)
            except StopIteration as stop:
                out[name] = stop.value
            states[name] = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
    return out


def log(args, msg):
    if not args.quiet:
        print(msg, flush=True)


def plot(results, path):
    """Loss and accuracy per epoch for every run; returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, r in results.items():
        h = r["history"]
        ep = range(1, len(h["train_loss"]) + 1)
        t = sum(h["epoch_s"]) / len(h["epoch_s"])
        style = dict(marker="o", ms=7, lw=2.5) if impl == "fused" else dict(marker="x", lw=1)
        a.plot(ep, h["train_loss"], "-", label=f"{impl} train ({t:.1f} s/epoch)", **style)
        a.plot(ep, h["val_loss"], ":", label=f"{impl} validation", **style)
        b.plot(ep, h["val_acc"], "-", label=f"{impl} (test {r['test_acc']:.3f})", **style)
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="CSV/TSV of text,label or a folder per label (aclImdb); "
                   "default: the generated corpus")
    p.add_argument("--test-data", help="a separate test set (same formats)")
    p.add_argument("--text-col", help="CSV column of the text (name or index)")
    p.add_argument("--label-col", help="CSV column of the label (name or index)")
    p.add_argument("--header", choices=["auto", "yes", "no"], default="auto",
                   help="whether a CSV's first row is a header (auto: it holds a known name)")
    p.add_argument("--train-size", type=int, default=6000, help="generated corpus: train rows")
    p.add_argument("--test-size", type=int, default=2000, help="generated corpus: test rows")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="held out for test when the data has no test split")
    p.add_argument("--embeddings", help="GloVe/word2vec text file")
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--min-freq", type=int, default=1)
    p.add_argument("--max-vocab", type=int, default=50000)
    p.add_argument("--max-len", type=int, default=400, help="tokens kept per text")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--patience", type=int, default=2, help="early stopping (epochs)")
    p.add_argument("--impl", choices=["fused", "torch", "both"], default="both")
    p.add_argument("--no-baseline", action="store_true", help="skip the bag-of-words baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "text_classification"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    return p.parse_args(argv)


def prepare(args):
    """Splits of (ids, label index), the vocabulary and the label names."""
    if args.data is None:
        args.data, args.test_data = map(str, generate_corpus(
            Path(args.out) / "corpus", args.train_size, args.test_size, args.seed))
    data = load_dataset(args.data, args.text_col, args.label_col, args.header)
    rows, test = data["train"], data["test"]
    if args.test_data:
        test = load_dataset(args.test_data, args.text_col, args.label_col, args.header)["train"]
    rows = rows[:]
    random.Random(args.seed).shuffle(rows)
    if test is None:
        k = max(1, int(len(rows) * args.test_fraction))
        test, rows = rows[:k], rows[k:]
    k = max(1, int(len(rows) * args.val_fraction))
    raw = {"val": rows[:k], "train": rows[k:], "test": test}
    labels = sorted({y for _, y in raw["train"]})
    toks = {s: [tokenize(t)[:args.max_len] for t, _ in r] for s, r in raw.items()}
    vocab = Vocab(toks["train"], args.min_freq, args.max_vocab)
    index = {y: i for i, y in enumerate(labels)}
    splits = {s: [(vocab.encode(t), index[y]) for t, (_, y) in zip(toks[s], raw[s])
                  if y in index] for s in raw}
    return splits, vocab, labels


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits, vocab, labels = prepare(args)
    log(args, f"data: {args.data}  train/val/test {len(splits['train'])}/{len(splits['val'])}"
        f"/{len(splits['test'])}  vocab {len(vocab)}  labels {labels}  device {args.device}  "
        f"threads {torch.get_num_threads()}")
    emb = None
    if args.embeddings:
        emb, found = load_embeddings(args.embeddings, vocab, args.emb_dim)
        log(args, f"embeddings: {found}/{len(vocab) - 2} words from {args.embeddings}")
    cfg = dict(vocab_size=len(vocab), emb_dim=args.emb_dim, hidden=args.hidden,
               classes=len(labels), layers=args.layers, dropout=args.dropout)
    models, runs = {}, {}
    for impl in (["fused", "torch"] if args.impl == "both" else [args.impl]):
        torch.manual_seed(args.seed)  # the same initial weights for both
        model = models[impl] = build_model(cfg, impl).to(args.device)
        if emb is not None:
            model.embedding.weight.data.copy_(emb)
            model.embedding.weight.requires_grad_(not args.freeze_embeddings)
        ckpt = dict(path=str(out / f"{impl}.pt"), config=cfg, itos=vocab.itos, labels=labels)
        runs[impl] = train(model, splits, args, impl, ckpt)
    results = {}
    for impl, hist in alternate(runs, args.seed).items():
        test_loss, test_acc = evaluate(models[impl], splits["test"], args.batch_size, args.device)
        epoch_s = sum(hist["epoch_s"]) / len(hist["epoch_s"])
        results[impl] = dict(history=hist, test_acc=test_acc, test_loss=test_loss,
                             checkpoint=str(out / f"{impl}.pt"), epoch_s=epoch_s)
        log(args, f"{impl}: test accuracy {test_acc:.4f}  mean train time per epoch "
            f"{epoch_s:.2f} s")
    if not args.no_baseline:
        torch.manual_seed(args.seed)
        bow = BagOfWords(len(vocab), args.emb_dim, args.hidden, len(labels)).to(args.device)
        hist = alternate({"bag-of-words": train(bow, splits, args, "bag-of-words")}, args.seed)
        _, acc = evaluate(bow, splits["test"], args.batch_size, args.device)
        results["bag-of-words"] = dict(test_acc=acc, history=hist["bag-of-words"])
        log(args, f"bag-of-words baseline: test accuracy {acc:.4f}")
    lstm_runs = {k: v for k, v in results.items() if k in IMPLS}
    if plot(lstm_runs, out / "learning_curves.png"):
        log(args, f"plot: {out / 'learning_curves.png'}")
    if len(lstm_runs) == 2:
        f, t = lstm_runs["fused"], lstm_runs["torch"]
        log(args, f"fused vs torch: test acc {f['test_acc']:.4f} vs {t['test_acc']:.4f}; "
            f"time per epoch {f['epoch_s']:.2f} s vs {t['epoch_s']:.2f} s "
            f"({t['epoch_s'] / f['epoch_s']:.2f}x)")
    with open(out / "results.json", "w") as fh:
        json.dump(dict(args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                       results=results), fh, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
