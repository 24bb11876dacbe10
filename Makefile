.PHONY: test export readme mirror docs docs-serve docs-quarto

test:  ## everything CI checks: export/clean in step, README, notebooks, pytest
	bash tools/test.sh

export:  ## notebooks -> library, clean notebooks, README from index.ipynb
	nbdev_export && nbdev_clean && python tools/make_readme.py

mirror:  ## build a local dataset mirror from the public host (needs internet)
	python tools/build_mirror.py $${DLCODERS_MIRROR:-$$HOME/.dlcoders/mirror}

docs:  ## the docs site in _build/site, without Quarto (executes notebooks whose executed copy is missing or stale)
	python tools/build_docs.py

docs-serve: docs  ## build the site, then serve it on http://127.0.0.1:8000
	python -m http.server 8000 --bind 127.0.0.1 --directory _build/site

docs-quarto:  ## the Quarto site (needs Quarto) in _docs/, with outputs: nbdev_docs on the executed notebooks
	python tools/build_docs.py --only-execute
	cp nbs/_quarto.yml nbs/nbdev.yml nbs/styles.css _build/nbs/
	nbdev_docs --path _build/nbs
	python tools/make_readme.py  # nbdev_docs may rewrite README.md with Quarto: put back the project's own
