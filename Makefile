.PHONY: test export readme mirror

test:  ## everything CI checks: export/clean in step, README, notebooks, pytest
	bash tools/test.sh

export:  ## notebooks -> library, clean notebooks, README from index.ipynb
	nbdev_export && nbdev_clean && python tools/make_readme.py

mirror:  ## build a local dataset mirror from the public host (needs internet)
	python tools/build_mirror.py $${DLCODERS_MIRROR:-$$HOME/.dlcoders/mirror}
