#!/usr/bin/env bash
# The project's one test command (`make test` calls this). It fails when:
#   the library in dlcoders/ is out of step with the notebooks (nbdev_export changes it),
#   a notebook is not clean (nbdev_clean changes it), README.md is out of step with nbs/index.ipynb,
#   any notebook cell fails (run like nbdev_test, by tools/run_nbs.py), the docs site does not build (make docs),
#   or any pytest test fails (tests/test_docs_site.py reads that site in headless chromium).
# Data: DLCODERS_DATA_URL if set; else ../shared/data/mirror if present; else a mirror built from the public host.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DLCODERS_DATA_URL:-}" ]; then
  if [ -d ../shared/data/mirror ]; then
    DLCODERS_DATA_URL="file://$(cd ../shared/data/mirror && pwd)"
  else
    mirror="${DLCODERS_MIRROR:-$HOME/.dlcoders/mirror}"
    echo "== no mirror configured: building one in $mirror (tools/build_mirror.py)"
    python tools/build_mirror.py "$mirror"
    DLCODERS_DATA_URL="file://$(cd "$mirror" && pwd)"
  fi
fi
export DLCODERS_DATA_URL
# A cache of its own, so the tests never pick up full-size datasets from a user's ~/.dlcoders.
export DLCODERS_HOME="${DLCODERS_TEST_HOME:-$PWD/.dlcoders_test}"
export MPLBACKEND=Agg
# nbdev_test runs two notebooks at once on two cores: one thread each avoids threads waiting on each other
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "== data from $DLCODERS_DATA_URL, cache in $DLCODERS_HOME"

snapshot() { find "$@" -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 md5sum; }

echo "== nbdev_export: is the library in step with the notebooks?"
before=$(snapshot dlcoders)
nbdev_export
if [ "$before" != "$(snapshot dlcoders)" ]; then
  echo "FAIL: nbdev_export changed dlcoders/ (it was out of step with nbs/): review and commit the result" >&2
  git status --short dlcoders >&2 || true
  exit 1
fi

echo "== nbdev_clean: are the notebooks clean?"
before=$(snapshot nbs)
nbdev_clean
if [ "$before" != "$(snapshot nbs)" ]; then
  echo "FAIL: nbdev_clean changed notebooks under nbs/: commit the cleaned notebooks" >&2
  git status --short nbs >&2 || true
  exit 1
fi

echo "== README.md in step with nbs/index.ipynb?"
python tools/make_readme.py --check

echo "== notebooks: every chapter notebook, run as nbdev_test runs them (tools/run_nbs.py keeps executed copies in _build/nbs)"
start=$(date +%s)
python tools/run_nbs.py --timing
echo "notebooks took $(( $(date +%s) - start )) s"

echo "== docs site: make docs (Sphinx, from nbdev's processing of the executed copies) -> _build/site"
start=$(date +%s)
python tools/build_docs.py --strict  # fails when nbdev's own docs processing fails on a notebook, as nbdev_docs would
echo "docs site took $(( $(date +%s) - start )) s"

if [ -n "${DLCODERS_CI_START:-}" ]; then echo "CI so far: $(( $(date +%s) - DLCODERS_CI_START )) s"; fi
echo "== pytest"
python -m pytest tests -q -p no:cacheprovider
