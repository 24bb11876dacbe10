"Text: tokenizer edge cases, caching of tokenized folders, language-model batches, classifiers, pretrained weights offline, export to a fresh process."
import os, subprocess, sys, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dlcoders.text.all import *
from dlcoders.text.core import TokenizedCorpus, tokenize_corpus
from dlcoders.text.learner import pretrained_files, map_embeddings

SMALL = dict(emb_sz=48, n_hid=96, n_layers=2)


@pytest.fixture(scope='module')
def imdb_df():
    if not os.environ.get('DLCODERS_DATA_URL'):
        from conftest import MIRROR
        if MIRROR is None: pytest.skip('no dataset mirror')
        os.environ['DLCODERS_DATA_URL'] = MIRROR.as_uri()
    path = untar_data(URLs.IMDB_SAMPLE)
    return path, pd.read_csv(path/'texts.csv')


# --- tokenization ------------------------------------------------------------------------------

@pytest.mark.parametrize('text', ['', '   ', 'I love it 😍🎬!!!', 'Это очень хороший фильм. ПРИВЕТ',
                                  '这部电影很好看', 'مرحبا بالعالم', 'Tom &amp; Jerry &lt;3 &#39;cool&#39; &nbsp; #39;s<br />x',
                                  'a\x00b\tc\r\nd'])
def test_tokenize_odd_texts(text):
    tkn = Tokenizer()
    toks = tkn(text)
    assert toks[0] == 'xxbos' and all(isinstance(t, str) for t in toks)
    assert isinstance(tkn.decode(toks), str)


def test_tokenize_one_megabyte_document():
    text = ('This is a RATHER long review, written again and again... ' * 20000)[:1_000_000]
    tkn = Tokenizer()
    toks = tkn(text)
    assert len(toks) > 150_000 and toks[0] == 'xxbos'


def _squash(s): return ''.join(s.split())

@pytest.mark.parametrize('text', ["The movie was GREAT, but Paris looked sooo grey!", "Hello world. It's 3 a.m. here",
                                  "Tom &amp; Jerry: the best!<br /><br />Really."])
def test_decode_encode_round_trip(text):
    "decode(encode(t)) == t up to the documented rules: spacing, HTML unescaped, <br /> as a newline."
    import html
    tkn = Tokenizer()
    expected = html.unescape(text.replace('<br />', '\n'))
    assert _squash(tkn.decode(tkn(text))) == _squash(expected)


def test_subword_round_trip_and_unknown_word():
    sp = SubwordTokenizer(vocab_sz=120)
    sp.setup(['the cat sat on the mat', 'the dog sat on the log', 'cats and dogs'] * 30)
    tkn = Tokenizer(sp)
    assert _squash(tkn.decode(tkn('The cat sat.'))) == _squash('The cat sat.')
    num = Numericalize(min_freq=1)
    num.setup([Tokenizer()(t) for t in ['a good movie', 'a bad movie']])
    ids = num(Tokenizer()('a zyxwvut movie'))
    assert num.vocab[ids[2]] == 'xxunk' and ids[2].item() == 0
    assert len(num.vocab) % 8 == 0


def test_parallel_tokenization_matches_in_process(imdb_df):
    _, df = imdb_df
    texts = df.text.tolist()[:300]
    one = tokenize_corpus(texts, n_workers=0, chunk_sz=100)
    two = tokenize_corpus(texts, n_workers=2, chunk_sz=100, show_progress=False)
    assert all(one.tokens(i) == two.tokens(i) for i in range(len(texts)))


def _write_folder(root, df, n=40):
    for i, (text, label) in enumerate(zip(df.text[:n], df.label[:n])):
        split = 'valid' if i % 4 == 0 else 'train'
        (root/split/label).mkdir(parents=True, exist_ok=True)
        (root/split/label/f'{i}.txt').write_text(text)


def test_folder_cache_is_reused_and_never_stale(imdb_df, tmp_path):
    _, df = imdb_df
    root = tmp_path/'reviews'
    _write_folder(root, df)
    tok = Tokenizer.from_folder(root)
    cache = tmp_path/'reviews_tok'/'corpus.npz'
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    files = get_text_files(root)
    first_toks = tok(files[0])
    # a second run loads the cache: same tokens, file not rewritten
    tok2 = Tokenizer.from_folder(root)
    assert cache.stat().st_mtime_ns == stamp and tok2(files[0]) == first_toks
    # a changed file is tokenized again
    time.sleep(0.01)
    files[0].write_text('A completely NEW review.')
    tok3 = Tokenizer.from_folder(root)
    assert tok3(files[0]) == ['xxbos', 'xxmaj', 'a', 'completely', 'xxup', 'new', 'review', '.']
    # other rules: tokenized again, never served from the old cache
    tok4 = Tokenizer.from_folder(root, rules=[lowercase])
    assert 'xxmaj' not in tok4(files[1]) and 'xxmaj' in tok3(files[1])


def test_from_folder_dataloaders(imdb_df, tmp_path):
    _, df = imdb_df
    root = tmp_path/'reviews'
    _write_folder(root, df)
    dls = TextDataLoaders.from_folder(root, bs=4)
    assert sorted(dls.vocab) == ['negative', 'positive']
    xb, yb = dls.one_batch()
    assert xb.shape[0] == 4 and yb.shape == (4,)
    dls_lm = TextDataLoaders.from_folder(root, is_lm=True, valid_pct=0.2, seed=0, bs=4, seq_len=16)
    xb, yb = dls_lm.one_batch()
    assert xb.shape == (4, 16) and torch.equal(xb[:, 1:], yb[:, :-1])


def test_bad_column_names_the_columns(imdb_df):
    _, df = imdb_df
    with pytest.raises(KeyError, match=r"'review'.*columns are \['label', 'text', 'is_valid'\]"):
        TextDataLoaders.from_df(df, text_col='review', label_col='label')
    with pytest.raises(ValueError, match='no text files'):
        Tokenizer.from_folder(Path(__file__).parent)


# --- language-model batches ----------------------------------------------------------------------

def test_lm_batches_are_contiguous():
    docs = [torch.arange(n) + 1000 * i for i, n in enumerate([37, 5, 120, 64, 3, 90])]
    dl = LMDataLoader(docs, bs=4, seq_len=7, shuffle=True)
    for _ in range(2):  # two epochs: a new document order each time, always contiguous rows
        batches = list(dl)
        assert len(batches) == len(dl)
        x = torch.cat([b[0] for b in batches], 1)
        y = torch.cat([b[1] for b in batches], 1)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for a, b in zip(batches, batches[1:]): assert torch.equal(a[1][:, -1], b[0][:, 0])
        stream = torch.cat([x.flatten(), y[-1, -1:]])
        assert sorted(torch.cat([x, y[:, -1:]], 1).flatten().tolist()) != []  # all tokens come from the documents
        assert set(stream.tolist()) <= set(torch.cat(docs).tolist())


def test_lm_order_changes_between_epochs():
    docs = [torch.full((10,), i) for i in range(50)]
    dl = LMDataLoader(docs, bs=2, seq_len=5, shuffle=True)
    a, b = torch.cat([x for x, _ in dl], 1), torch.cat([x for x, _ in dl], 1)
    assert not torch.equal(a, b)


# --- models and learners -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def clas_learner(imdb_df):
    path, df = imdb_df
    set_seed(42)
    dls = DataBlock(blocks=(TextBlock.from_df('text', max_vocab=2000), CategoryBlock), get_y=ColReader('label'),
                    splitter=ColSplitter('is_valid')).dataloaders(df, path=path, bs=32)
    learn = text_classifier_learner(dls, AWD_LSTM, config=SMALL, pretrained=False, drop_mult=0.3, metrics=accuracy)
    learn.fit_one_cycle(3, 1e-2)
    return learn


def test_classifier_beats_majority(clas_learner):
    labels = torch.cat([y for _, y in clas_learner.dls.valid])
    majority = torch.bincount(labels).max().item() / len(labels)
    assert clas_learner.recorder.values[-1][2] > majority


def test_predict_long_text(clas_learner, imdb_df):
    _, df = imdb_df
    text = ' '.join(df.text[:30])
    assert len(Tokenizer()(text)) > 10 * 72
    pred, idx, probs = clas_learner.predict(text)
    assert pred in ['negative', 'positive'] and probs.shape == (2,) and abs(probs.sum().item() - 1) < 1e-5
    assert clas_learner.predict('') [0] in ['negative', 'positive']


def test_padding_does_not_change_predictions(clas_learner, imdb_df):
    "In a batch, a short text is padded; its prediction equals its prediction alone."
    _, df = imdb_df
    texts = df.text[df.is_valid].tolist()[:6]
    dl = clas_learner.dls.test_dl(texts)
    preds, _ = clas_learner.get_preds(dl=dl)
    alone = torch.stack([clas_learner.predict(t)[2] for t in texts])
    order = [int(i) for i in dl._batches()[0]]  # SortedDL orders by length
    assert torch.allclose(preds, alone[order], atol=1e-4)


def test_export_predicts_the_same_in_a_fresh_process(clas_learner, tmp_path):
    text = 'An absolutely wonderful film, with great acting and a moving story.'
    probs = clas_learner.predict(text)[2]
    fname = clas_learner.export(tmp_path/'clas.pkl')
    code = ("import sys; from dlcoders.learner import load_learner; "
            "l = load_learner(sys.argv[1]); print(' '.join(map(repr, l.predict(sys.argv[2])[2].tolist())))")
    out = subprocess.run([sys.executable, '-c', code, str(fname), text], capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr
    fresh = torch.tensor([float(v) for v in out.stdout.split()])
    assert torch.allclose(fresh, probs, atol=1e-5)


def test_fine_tune_and_gradual_unfreezing(imdb_df):
    path, df = imdb_df
    dls = TextDataLoaders.from_df(df.iloc[:200], path=path, text_col='text', label_col='label', valid_pct=0.2, seed=0, bs=16)
    learn = text_classifier_learner(dls, AWD_LSTM, config=SMALL, pretrained=False, metrics=accuracy)
    n_groups = len(learn.splitter(learn.model))
    assert n_groups == 4  # embedding, two LSTM layers, head
    learn.freeze_to(-2)
    trainable = [any(p.requires_grad for p in g) for g in learn.splitter(learn.model)]
    assert trainable == [False, False, True, True]
    learn.fine_tune(1, 1e-2)
    assert len(learn.recorder.values) == 1


def test_language_model_encoder_into_classifier_with_other_vocab(imdb_df, tmp_path):
    path, df = imdb_df
    small_df = df.iloc[:150]
    dls_lm = TextDataLoaders.from_df(small_df, path=tmp_path, text_col='text', is_lm=True, valid_pct=0.2, seed=0, bs=8, seq_len=20)
    lm = language_model_learner(dls_lm, AWD_LSTM, config=SMALL, pretrained=False, metrics=[accuracy, Perplexity()])
    lm.fit(1, 1e-3)
    gen = lm.predict('This movie is', 5, temperature=0.5)
    assert gen.startswith('This movie is') and len(gen.split()) >= 6
    lm.save_encoder('enc')
    dls = TextDataLoaders.from_df(df.iloc[100:250], path=tmp_path, text_col='text', label_col='label', valid_pct=0.2, seed=0, bs=8)
    assert dls_lm.vocab != text_vocab(dls)
    clas = text_classifier_learner(dls, AWD_LSTM, config=SMALL, pretrained=False)
    clas.load_encoder('enc')
    lm_emb, c_emb = lm.model[0].encoder.weight, clas.model[0].module.encoder.weight
    shared = [w for w in text_vocab(dls) if w in dls_lm.vocab and not w.startswith('xxfake')][:50]
    for w in shared: assert torch.equal(c_emb[text_vocab(dls).index(w)], lm_emb[dls_lm.vocab.index(w)])


def test_pretrained_offline_warns_and_uses_random_weights(dl_env, imdb_df):
    path, df = imdb_df
    dls = TextDataLoaders.from_df(df.iloc[:60], path=path, text_col='text', is_lm=True, valid_pct=0.2, seed=0, bs=4, seq_len=10)
    with pytest.warns(UserWarning, match='random weights'):
        learn = language_model_learner(dls, AWD_LSTM, config=SMALL)
    assert learn.opt is not None  # frozen, ready to train


def test_pretrained_unreachable_online_is_a_clear_error(dl_env, monkeypatch, tmp_path):
    monkeypatch.delenv('DLCODERS_OFFLINE')
    monkeypatch.setenv('DLCODERS_DATA_URL', (tmp_path/'empty_mirror').as_uri())
    with pytest.raises(OSError, match='pretrained=False'):
        pretrained_files(AWD_LSTM)


def test_book_rnn_regularizer_on_a_plain_learner():
    class Triple(Module):
        def __init__(self): self.emb, self.lin = nn.Embedding(12, 8), nn.Linear(8, 12)
        def forward(self, x):
            raw = self.emb(x)
            return self.lin(raw), raw, raw
        def reset(self): pass
    x = torch.randint(0, 12, (64, 6))
    dls = DataLoaders(DataLoader((x, x), bs=16), DataLoader((x, x), bs=16))
    learn = Learner(dls, Triple(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=[ModelResetter, RNNRegularizer(alpha=2, beta=1)])
    learn.fit_one_cycle(4, 3e-2)
    assert learn.recorder.values[-1][0] < learn.recorder.values[0][0]  # the (unregularized) training loss falls
    preds, targs = learn.get_preds()
    assert preds.shape == (64, 6, 12)


def test_load_pretrained_files_maps_vocab_and_checks_shapes(imdb_df, tmp_path):
    "A model-zoo style archive (state dict with '0.'/'1.' keys, vocabulary pickled as a list) loads into both learners."
    import pickle
    path, df = imdb_df
    dls = TextDataLoaders.from_df(df.iloc[:80], path=tmp_path, text_col='text', is_lm=True, valid_pct=0.2, seed=0, bs=4, seq_len=10)
    old_vocab = ['xxunk', 'xxpad', 'the', 'movie', 'zzzz'] + [f'w{i}' for i in range(11)]
    src = get_language_model(AWD_LSTM, len(old_vocab), config=SMALL)
    wgts = {**src.state_dict(), '0.rnns.0.module.weight_hh_l0': torch.zeros(1)}  # an extra entry is ignored
    torch.save(wgts, tmp_path/'lm.pth')
    (tmp_path/'lm.pkl').write_bytes(pickle.dumps(old_vocab))
    lm = language_model_learner(dls, AWD_LSTM, config=SMALL, pretrained_fnames=(tmp_path/'lm.pth', tmp_path/'lm.pkl'))
    v = text_vocab(dls)
    emb = lm.model[0].encoder.weight
    assert torch.equal(emb[v.index('the')], src[0].encoder.weight[2])
    with pytest.raises(RuntimeError, match='default configuration'):
        language_model_learner(dls, AWD_LSTM, config=dict(emb_sz=8, n_hid=8, n_layers=1),
                               pretrained_fnames=(tmp_path/'lm.pth', tmp_path/'lm.pkl'))
    (tmp_path/'evil.pkl').write_bytes(pickle.dumps([os.getcwd, 'x']))
    with pytest.raises(pickle.UnpicklingError):
        language_model_learner(dls, AWD_LSTM, config=SMALL, pretrained_fnames=(tmp_path/'lm.pth', tmp_path/'evil.pkl'))


def test_show_batch_and_show_results_are_tables(clas_learner):
    df = clas_learner.dls.train.show_batch(max_n=2, show=False)
    assert list(df.columns) == ['text', 'category'] and len(df) == 2 and 'xxpad' not in df.text[0]
    b = clas_learner.dls.valid.one_batch()
    _, _, dec = clas_learner.get_preds(dl=[b], with_decoded=True)
    res = clas_learner.dls.valid.show_results(b, dec, max_n=3, show=False)
    assert list(res.columns) == ['text', 'target', 'prediction'] and set(res.prediction) <= {'negative', 'positive'}
