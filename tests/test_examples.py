"""The examples: their loaders on tiny fixture files, tiny training runs (the
loss goes down, fused and torch agree) and checkpoints that reload into
torch's modules with the same predictions."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import lstm_fused

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tc = _load("text_classification")
s2s = _load("seq2seq")


# ---------------------------------------------------------------- text classification


def test_tokenize():
    assert tc.tokenize("Not GOOD, isn't it?<br />Bad.") == [
        "not", "good", ",", "isn't", "it", "?", "bad", "."]


def test_load_csv_with_header(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('label,text\npos,"good, really"\nneg,bad film\n')
    assert tc.load_dataset(p) == {"train": [("good, really", "pos"), ("bad film", "neg")],
                                  "test": None}


def test_load_tsv_without_header(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("a fine film\t1\nnot fine\t0\n")
    assert tc.load_table(p) == [("a fine film", "1"), ("not fine", "0")]


def test_load_csv_named_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,body,stars\n1,great,5\n2,awful,1\n")
    assert tc.load_table(p, text_col="body", label_col="stars") == [("great", "5"), ("awful", "1")]
    assert tc.load_table(p, text_col="1", label_col="2", header="yes") == [
        ("great", "5"), ("awful", "1")]
    assert tc.load_table(p, text_col="1", label_col="2")[0] == ("body", "stars")
    with pytest.raises(ValueError, match="no column 'title'"):
        tc.load_table(p, text_col="title")


def _imdb(root):
    """The aclImdb layout: {train,test}/{pos,neg}/*.txt, train/unsup ignored."""
    texts = {}
    for split in ("train", "test"):
        for label, words in (("pos", "good"), ("neg", "bad")):
            d = root / split / label
            d.mkdir(parents=True)
            for k in range(3):
                (d / f"{k}_7.txt").write_text(f"a {words} film {k}<br />{split}")
                texts.setdefault(split, []).append((f"a {words} film {k}<br />{split}", label))
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("no label")
    (root / "train" / "urls_pos.txt").write_text("http://x")
    return texts


def test_load_imdb_layout(tmp_path):
    texts = _imdb(tmp_path / "aclImdb")
    data = tc.load_dataset(tmp_path / "aclImdb")
    assert sorted(data["train"]) == sorted(texts["train"])
    assert sorted(data["test"]) == sorted(texts["test"])
    # a folder per label without splits
    assert sorted(tc.load_dataset(tmp_path / "aclImdb" / "test")["train"]) == sorted(texts["test"])


@pytest.mark.parametrize("word2vec", [False, True], ids=["glove", "word2vec"])
def test_load_embeddings(tmp_path, word2vec):
    p = tmp_path / "vectors.txt"
    p.write_text(("3 2\n" if word2vec else "") + "good 0.5 -1.0\nthe 2 3\nzebra 9 9\n")
    vocab = tc.Vocab([["the", "good", "bad", "the"]])
    weight, found = tc.load_embeddings(p, vocab, 2)
    assert found == 2 and weight.shape == (len(vocab), 2)
    assert weight[vocab.stoi["good"]].tolist() == [0.5, -1.0]
    assert weight[vocab.stoi["the"]].tolist() == [2.0, 3.0]
    assert weight[0].tolist() == [0.0, 0.0]  # padding
    with pytest.raises(ValueError, match="--emb-dim is 3"):
        tc.load_embeddings(p, vocab, 3)


def test_vocab():
    v = tc.Vocab([["a", "b", "a"], ["c", "a", "b"]], min_freq=2)
    assert v.itos == ["<pad>", "<unk>", "a", "b"]
    assert v.encode(["b", "zzz", "a"]) == [3, 1, 2]


def test_generated_corpus(tmp_path):
    train, test = tc.generate_corpus(tmp_path, 60, 20, seed=1)
    a, b = tc.load_table(train), tc.load_table(test)
    assert len(a) == 60 and len(b) == 20 and not {t for t, _ in a} & {t for t, _ in b}
    assert {y for _, y in a} == {"positive", "negative"}
    assert tc.generate_corpus(tmp_path / "again", 60, 20, seed=1) and \
        tc.load_table(tmp_path / "again" / "train.csv") == a  # deterministic


def _easy_csv(path, n=100, seed=0):
    """Labelled by one word amid random ones: learnt in a few steps."""
    rng = random.Random(seed)
    words = "the a film plot was is and very it this".split()
    with open(path, "w") as f:
        f.write("text,label\n")
        for _ in range(n):
            y = rng.random() < 0.5
            text = rng.choices(words, k=rng.randint(1, 6)) + ["good" if y else "bad"] + \
                rng.choices(words, k=rng.randint(0, 6))
            f.write(f"{' '.join(text)},{'pos' if y else 'neg'}\n")
    return path


def test_text_classification_tiny_run(tmp_path):
    """Both impls on a tiny CSV: the loss goes down, the two histories agree,
    and the fused checkpoint gives the same predictions on torch.nn.LSTM."""
    argv = ["--data", str(_easy_csv(tmp_path / "easy.csv")), "--epochs", "4",
            "--batch-size", "16", "--emb-dim", "8", "--hidden", "16", "--lr", "3e-2",
            "--dropout", "0.1", "--quiet", "--out", str(tmp_path), "--no-baseline"]
    res = tc.main(argv)
    for impl in ("fused", "torch"):
        loss = res[impl]["history"]["step_loss"]
        assert len(loss) == 4 * 6  # 81 training rows in batches of 16
        assert sum(loss[-6:]) < 0.6 * sum(loss[:6]), loss
    torch.testing.assert_close(torch.tensor(res["fused"]["history"]["step_loss"]),
                               torch.tensor(res["torch"]["history"]["step_loss"]),
                               rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "results.json").read_text())["results"]["fused"]["test_acc"] \
        == res["fused"]["test_acc"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "learning_curves.png").stat().st_size > 10000

    ours, vocab, labels = tc.load_checkpoint(res["fused"]["checkpoint"], impl="fused")
    ref, vocab2, labels2 = tc.load_checkpoint(res["fused"]["checkpoint"], impl="torch")
    assert type(ref.lstm) is nn.LSTM and type(ours.lstm) is lstm_fused.LSTM
    assert vocab.itos == vocab2.itos and labels == labels2 == ["neg", "pos"]
    splits, _, _ = tc.prepare(tc.parse_args(argv))
    tokens, lengths, _ = tc.collate(splits["test"], "cpu")
    with torch.no_grad():
        a, b = ours(tokens, lengths), ref(tokens, lengths)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))
    _, acc = tc.evaluate(ref, splits["test"], 16, "cpu")
    assert acc == res["fused"]["test_acc"]


def test_text_classification_imdb_glove(tmp_path):
    """A run on the aclImdb layout with a GloVe file: the embedding rows of the
    words found start as their vectors; frozen, they stay so."""
    _imdb(tmp_path / "aclImdb")
    glove = tmp_path / "glove.txt"
    glove.write_text("good 1 2 3 4\nbad -1 -2 -3 -4\nfilm 0 0 0 1\n")
    res = tc.main(["--data", str(tmp_path / "aclImdb"), "--embeddings", str(glove),
                   "--freeze-embeddings", "--emb-dim", "4", "--hidden", "4", "--epochs", "1",
                   "--impl", "fused", "--quiet", "--out", str(tmp_path / "out"),
                   "--val-fraction", "0.2"])
    assert 0.0 <= res["fused"]["test_acc"] <= 1.0 and "bag-of-words" in res
    model, vocab, labels = tc.load_checkpoint(res["fused"]["checkpoint"], impl="torch")
    assert labels == ["neg", "pos"]
    emb = model.embedding.weight
    assert emb[vocab.stoi["good"]].tolist() == [1, 2, 3, 4]
    assert emb[vocab.stoi["bad"]].tolist() == [-1, -2, -3, -4]


# ---------------------------------------------------------------- seq2seq


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (105, "one hundred five"),
    (1000, "one thousand"), (40712, "forty thousand seven hundred twelve"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine")])
def test_to_words(n, words):
    assert " ".join(s2s.to_words(n)) == words


def test_splits_disjoint():
    sp = s2s.make_splits(dict(train=300, test=100), seed=3, max_digits=4)
    key = [{tuple(s) for s, _ in sp[k]} for k in ("train", "test")]
    assert len(key[0]) == 300 and len(key[1]) == 100 and not key[0] & key[1]
    s, t = sp["train"][0]
    n = int("".join(s2s.SRC_VOCAB[i] for i in s))
    assert s2s.decode_words(t) == " ".join(s2s.to_words(n)) and t[-1] == s2s.EOS


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "plain"])
def test_seq2seq_tiny_run(tmp_path, attention):
    argv = ["--train-size", "512", "--val-size", "32", "--test-size", "32", "--epochs", "4",
            "--batch-size", "32", "--emb", "16", "--hidden", "32", "--lr", "1e-2",
            "--max-digits", "3", "--quiet", "--out", str(tmp_path)]
    res = s2s.main(argv + (["--impl", "both"] if attention else ["--impl", "fused",
                                                                  "--no-attention"]))
    loss = res["fused"]["history"]["step_loss"]
    assert len(loss) == 4 * 16
    assert sum(loss[-16:]) < 0.7 * sum(loss[:16]), loss
    if attention:  # torch's modules from the same initial weights: the same run
        torch.testing.assert_close(torch.tensor(loss),
                                   torch.tensor(res["torch"]["history"]["step_loss"]),
                                   rtol=1e-4, atol=1e-4)

    ours = s2s.load_checkpoint(res["fused"]["checkpoint"], impl="fused")
    ref = s2s.load_checkpoint(res["fused"]["checkpoint"], impl="torch")
    assert type(ref.encoder) is nn.LSTM and type(ref.cells[0]) is nn.LSTMCell
    assert type(ours.encoder) is lstm_fused.LSTM and type(ours.cells[0]) is lstm_fused.LSTMCell
    data = s2s.make_splits(dict(train=512, val=32, test=32), 0, 3)["test"]
    src, lengths, tgt_in, _ = s2s.collate(data, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(src, lengths, tgt_in), ref(src, lengths, tgt_in),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.greedy(src, lengths), ref.greedy(src, lengths))
    assert s2s.exact_match(ref, data, 32, "cpu") == res["fused"]["test_exact"]


def test_seq2seq_step_gradients_match_torch():
    """One teacher-forced batch: loss and every parameter gradient of the fused
    model equal torch's (float64)."""
    torch.manual_seed(0)
    ours = s2s.Seq2Seq(6, 8, 2, True, "fused").double()
    ref = s2s.Seq2Seq(6, 8, 2, True, "torch").double()
    ref.load_state_dict(ours.state_dict())
    data = s2s.make_splits(dict(train=5), 1, 4)["train"]
    src, lengths, tgt_in, tgt = s2s.collate(data, "cpu")
    for m in (ours, ref):
        loss = torch.nn.functional.cross_entropy(m(src, lengths, tgt_in).flatten(0, 1),
                                                 tgt.flatten(), ignore_index=s2s.PAD)
        loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=name)
