# Two commands do everything on a fresh Debian machine (as root or with sudo):
#   make demo   install, make a demo versioned file, mount it, print what to try
#   make test   install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config hdf5-tools rsync gcc python3-dev python3-venv systemd util-linux
BENCH_PACKAGES := rclone s3fs
DEMO_DIR ?= /tmp/versionfs-demo
PREFIX ?= /usr/local
SBIN ?= /sbin
UNIT_DIR ?= /etc/systemd/system
PACKAGES = $(SYSTEM_PACKAGES)

.PHONY: setup install system-deps test test-slow bench demo umount-demo clean

system-deps:
	@missing=$$(for p in $(PACKAGES); do \
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

# Everything the commands, the tests and the demo need, in place.
setup: system-deps $(VENV)/.installed

# The system-wide pieces: the command, the mount(8) helper, the systemd units.
install: setup
	$(SUDO) ln -sf $(CURDIR)/$(VENV)/bin/versionfs $(PREFIX)/bin/versionfs
	$(SUDO) sed 's#^VERSIONFS=.*#VERSIONFS="$(PREFIX)/bin/versionfs"#' mount_helpers/mount.fuse.versionfs > mount.fuse.versionfs.tmp
	$(SUDO) install -m 755 mount.fuse.versionfs.tmp $(SBIN)/mount.fuse.versionfs
	rm -f mount.fuse.versionfs.tmp
	$(SUDO) install -d $(UNIT_DIR) /etc/versionfs
	$(SUDO) install -m 644 systemd/versionfs@.service systemd/versionfs-sync@.service systemd/versionfs-sync@.timer $(UNIT_DIR)/
	$(SUDO) install -m 644 systemd/versionfs.env.example /etc/versionfs/
	$(SUDO) systemctl daemon-reload 2>/dev/null || true

test: setup
	$(VENV)/bin/pytest

test-slow: setup
	$(VENV)/bin/pytest -m slow

bench: PACKAGES = $(SYSTEM_PACKAGES) $(BENCH_PACKAGES)
bench: setup
	$(PY) bench/run.py

demo: setup
	$(VENV)/bin/versionfs demo $(DEMO_DIR)

umount-demo:
	$(VENV)/bin/versionfs umount $(DEMO_DIR)/mnt

clean:
	rm -rf $(VENV) build *.egg-info
