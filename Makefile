# Two commands do everything on a fresh Debian machine (as root or with sudo):
#   make demo   install, make a demo versioned file, mount it, print what to try
#   make test   install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config hdf5-tools rsync gcc python3-dev python3-venv
DEMO_DIR ?= /tmp/versionfs-demo

.PHONY: install system-deps test test-slow bench demo umount-demo clean

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: system-deps $(VENV)/.installed

test: install
	$(VENV)/bin/pytest

test-slow: install
	$(VENV)/bin/pytest -m slow

bench: install
	$(PY) bench/run.py

demo: install
	$(VENV)/bin/versionfs demo $(DEMO_DIR)

umount-demo:
	$(VENV)/bin/versionfs umount $(DEMO_DIR)/mnt

clean:
	rm -rf $(VENV) build *.egg-info
