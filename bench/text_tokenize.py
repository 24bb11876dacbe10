"""How fast does `Tokenizer` turn text into tokens, next to spaCy's bare tokenizer?

The IMDb sample's reviews, repeated until they hold at least --words words (default 1,000,000), are tokenized by:
  (a) spaCy:      `spacy.blank('en').tokenizer.pipe(texts)` and the token strings, nothing else (the floor);
  (b) Tokenizer:  the library's rules (`defaults.text_proc_rules`), `WordTokenizer` (spaCy) and the special tokens,
                  into a `TokenizedCorpus`, in this process (`n_workers=0`);
  (c) Tokenizer with 2 worker processes (`n_workers=2`).
Prints words per second (words = whitespace-separated words of the raw text) and the ratio (b) / (a) time.
(a) reads each token's text, the usual way to get spaCy's tokens; (b) delivers the corpus the data pipelines use:
the distinct tokens once and every text as indices into them (read from spaCy's arrays, no Python object per token).
(Not named `tokenize.py`: that name shadows the standard library's `tokenize` for every script in this folder.)
Target: the rules and special tokens cost at most 1.5x the bare tokenizer (ratio <= 1.5).
Run: python bench/text_tokenize.py [--words 1000000] [--repeats 1]
"""
import argparse, os, statistics, time
import pandas as pd
os.environ.setdefault('OMP_NUM_THREADS', '1')
from dlcoders.data.external import untar_data, URLs
from dlcoders.text.core import WordTokenizer, tokenize_corpus

def corpus(n_words:int) -> list:
    texts = pd.read_csv(untar_data(URLs.IMDB_SAMPLE)/'texts.csv').text.tolist()
    per_pass = sum(len(t.split()) for t in texts)
    return texts * -(-n_words // per_pass)

def bare_spacy(texts) -> float:
    nlp = WordTokenizer().nlp  # spacy.blank('en'), the same tokenizer
    t0 = time.perf_counter()
    n = sum(len([t.text for t in doc]) for doc in nlp.tokenizer.pipe(texts, batch_size=5000))
    return time.perf_counter() - t0

def library(texts, n_workers:int) -> float:
    t0 = time.perf_counter()
    tokenize_corpus(texts, n_workers=n_workers, show_progress=False)
    return time.perf_counter() - t0

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--words', type=int, default=1_000_000)
    p.add_argument('--repeats', type=int, default=1)
    args = p.parse_args()
    texts = corpus(args.words)
    n_words = sum(len(t.split()) for t in texts)
    print(f"{len(texts)} reviews, {n_words:,} words, {os.cpu_count()} CPUs")
    times = {'spaCy bare': [], 'Tokenizer, 1 process': [], 'Tokenizer, 2 processes': []}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows all of them alike
        times['spaCy bare'].append(bare_spacy(texts))
        times['Tokenizer, 1 process'].append(library(texts, 0))
        times['Tokenizer, 2 processes'].append(library(texts, 2))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, t in med.items(): print(f"{k:<24} {t:7.2f} s  {n_words / t:>10,.0f} words/s")
    ratio = med['Tokenizer, 1 process'] / med['spaCy bare']
    print(f"Tokenizer (1 process) / bare spaCy time: {ratio:.2f} (target <= 1.5)")
    print(f"2 processes speed-up over 1: {med['Tokenizer, 1 process'] / med['Tokenizer, 2 processes']:.2f}x")

if __name__ == '__main__': main()
