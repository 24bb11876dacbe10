"""Run every bench in this folder, each in its own process, and print one table of ratios.

Each bench measures the library against a hand-written PyTorch loop doing the same work in the same run, and
prints ratios (`fit / floor`, `learn.predict / hand-written`...). This script runs them one after the other (with
their quick flags, or their defaults with --full), picks the ratios out of what each prints, and shows them in one
table: one row per measure, the dlcoders ratio, and the fastai ratio of the same measure where a fastai
counterpart exists and fastai imports (`loop_overhead_fastai.py`; fastai is never a dependency). A bench that fails
or times out gets a row saying so, and the table still comes out. A bench added to this folder later is run too,
with its defaults (or `--quick` when its `--help` offers it), and its ratios are found by the generic rule below.

Ratios > 1 mean the library is slower (a time ratio) unless the measure says it is a rate (`img/s`), where < 1 is
slower. Timings on a busy machine are noise: run it on a quiet one.
Run from the repository root:  python bench/run_all.py [--full] [--only loop_overhead predict] [--timeout 900]
"""
import argparse, importlib.util, os, re, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {'run_all.py', '_common.py'}
QUICK = {  # small sizes, one repeat: minutes for the whole table
    'loop_overhead.py': ['--repeats', '1', '--n', '10000'],
    'loop_overhead_fastai.py': ['--repeats', '1', '--n', '10000'],
    'collab.py': ['--rows', '100000', '--repeats', '1', '--bs', '1024'],
    'data_pipeline.py': ['--reps', '1', '--workers', '0'],
    'predict.py': ['--n', '5', '--reps', '1'],
    'tabular.py': ['--rows', '100000', '--repeats', '1'],
    'text_tokenize.py': ['--words', '100000'],
    'text_train.py': ['--repeats', '1'],
    'gpu_check.py': ['--quick'],
}

_NUM = r'(\d+\.\d+)'

def parse_loop_table(out:str, column:str) -> list:
    "Rows `model bs ... ratio` of the loop-overhead tables: (measure, ratio)."
    rows = []
    for line in out.splitlines():
        m = re.match(r'\s*(mlp|cnn)\s+(\d+)\s+.*?ms\s+' + _NUM, line)
        if m: rows.append((f'{m[1]} bs {m[2]}: {column}', float(m[3])))
    return rows

def parse_generic(out:str) -> list:
    "Any `A / B <sep> number`, or `label: ... | ratio number`, in the output: (the label, the number)."
    rows = []
    for line in out.splitlines():
        bs = re.search(r'\bbs (\d+)', line)
        prefix = f'bs {bs[1]}: ' if bs else ''
        m = re.match(r'\s*([^:|]*?)[,:(].*\|.*?\bratio\s+' + _NUM, line)
        if m:
            rows.append((f'{prefix}{m[1].strip()} / hand-written', float(m[2])))
            continue
        for m in re.finditer(r'([A-Za-z][\w .+()-]*?\s*/\s*[\w .+()-]*?)\s*(?:=|:)?\s+' + _NUM, line):
            rows.append((prefix + ' '.join(m[1].split()), float(m[2])))
    return rows

PARSERS = {
    'loop_overhead.py': lambda out: parse_loop_table(out, 'fit / floor'),
    'loop_overhead_fastai.py': lambda out: parse_loop_table(out, 'fit / floor'),
}

def run_bench(path:Path, full:bool, timeout:float) -> tuple:
    "Run one bench; return (return code or a word, its stdout, seconds)."
    args = [] if full else QUICK.get(path.name)
    if args is None:
        helptext = subprocess.run([sys.executable, str(path), '--help'], capture_output=True, text=True, cwd=HERE,
                                  timeout=120).stdout
        args = ['--quick'] if '--quick' in helptext and not full else []
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                             cwd=HERE.parent, env={**os.environ, 'PYTHONPATH': os.pathsep.join(
                                 [str(HERE), str(HERE.parent), os.environ.get('PYTHONPATH', '')])})
        return res.returncode, res.stdout + ('' if res.returncode == 0 else '\n' + res.stderr[-2000:]), time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
        return 'timeout', out, time.perf_counter() - t0

def table(results:dict) -> str:
    "One table: bench, measure, dlcoders ratio, fastai ratio (where measured)."
    fastai = dict(results.pop('loop_overhead_fastai.py', (None, [], ''))[1])
    lines = [f"{'bench':<18} {'measure':<58} {'dlcoders':>9} {'fastai':>8}", '-' * 96]
    for name, (status, rows, note) in results.items():
        if status != 0: lines.append(f"{name[:-3]:<18} {'(' + str(status) + ')':<58} {'-':>9} {'-':>8}")
        elif not rows: lines.append(f"{name[:-3]:<18} {'(no ratios) ' + note[:70]}")
        for measure, ratio in rows:
            fa = fastai.get(measure)
            lines.append(f"{name[:-3]:<18} {measure[:58]:<58} {ratio:>9.3f} {('%.3f' % fa) if fa else '-':>8}")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--full', action='store_true', help="each bench's default sizes instead of the quick ones")
    p.add_argument('--only', nargs='*', help='bench names (without .py) to run')
    p.add_argument('--timeout', type=float, default=900, help='seconds per bench')
    p.add_argument('--show-output', action='store_true', help="also print each bench's own output")
    a = p.parse_args()
    benches = sorted(f for f in HERE.glob('*.py') if f.name not in SKIP and (not a.only or f.stem in a.only))
    has_fastai = importlib.util.find_spec('fastai') is not None
    print(f"{len(benches)} benches; fastai {'importable' if has_fastai else 'not importable: no fastai column'}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for path in benches:
        status, out, secs = run_bench(path, a.full, a.timeout)
        rows = PARSERS.get(path.name, parse_generic)(out)
        note = next((l.strip() for l in reversed(out.splitlines()) if l.strip()), '') if not rows else ''
        results[path.name] = (status, rows, note)
        print(f"  {path.stem}: {'ok' if status == 0 else status}, {len(rows)} ratios, {secs:.0f}s", flush=True)
        if a.show_output or status != 0: print('    ' + '\n    '.join(out.strip().splitlines()[-15:]))
    print()
    print(table(results))

if __name__ == '__main__': main()
