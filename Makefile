# Two commands do everything on a fresh Debian machine (as root or with sudo):
#   make demo   install, make a demo versioned file, mount it, print what to try
#   make test   install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config hdf5-tools rsync gcc python3-dev python3-venv systemd util-linux zsh groff-base
BENCH_PACKAGES := rclone s3fs
DEMO_DIR ?= /tmp/versionfs-demo
# Where `make install` puts things; DESTDIR (empty: /) is prepended to each, for
# staged installs and the tests. `make uninstall` with the same values undoes it.
DESTDIR ?=
PREFIX ?= /usr/local
SBIN ?= /sbin
UNIT_DIR ?= /etc/systemd/system
ETC_DIR ?= /etc/versionfs
BASH_COMPLETION_DIR ?= $(PREFIX)/share/bash-completion/completions
ZSH_COMPLETION_DIR ?= $(PREFIX)/share/zsh/site-functions
MAN_DIR ?= $(PREFIX)/share/man/man1
UNITS := versionfs@.service versionfs-sync@.service versionfs-sync@.timer
INSTALLED = $(DESTDIR)$(PREFIX)/bin/versionfs $(DESTDIR)$(SBIN)/mount.fuse.versionfs \
	$(addprefix $(DESTDIR)$(UNIT_DIR)/,$(UNITS)) $(DESTDIR)$(ETC_DIR)/versionfs.env.example \
	$(DESTDIR)$(BASH_COMPLETION_DIR)/versionfs $(DESTDIR)$(ZSH_COMPLETION_DIR)/_versionfs $(DESTDIR)$(MAN_DIR)/versionfs.1
PACKAGES = $(SYSTEM_PACKAGES)

.PHONY: setup install uninstall system-deps test test-slow bench demo umount-demo clean

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
	$(PY) -m pip install -q -e '.[test,man]'
	touch $@

# Everything the commands, the tests and the demo need, in place.
setup: system-deps $(VENV)/.installed

# The system-wide pieces: the command, the mount(8) helper, the systemd units,
# shell completion (bash, zsh) and the man page, the last two generated from the
# command's own argument parser.
install: setup
	mkdir -p build
	$(VENV)/bin/versionfs completion bash > build/versionfs.bash
	$(VENV)/bin/versionfs completion zsh > build/_versionfs
	$(VENV)/bin/argparse-manpage --module versionfs.cli --function parser --project-name versionfs \
	  --version "$$($(PY) -c 'import versionfs; print(versionfs.__version__)')" --manual-title "versionfs manual" \
	  --description "browse, diff and restore the history of data as ordinary directories" --output build/versionfs.1
	sed 's#^VERSIONFS=.*#VERSIONFS="$(PREFIX)/bin/versionfs"#' mount_helpers/mount.fuse.versionfs > build/mount.fuse.versionfs
	for unit in $(UNITS); do sed 's#/usr/local/bin/versionfs#$(PREFIX)/bin/versionfs#g' systemd/$$unit > build/$$unit; done
	$(SUDO) install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SBIN) $(DESTDIR)$(UNIT_DIR) $(DESTDIR)$(ETC_DIR) \
	  $(DESTDIR)$(BASH_COMPLETION_DIR) $(DESTDIR)$(ZSH_COMPLETION_DIR) $(DESTDIR)$(MAN_DIR)
	$(SUDO) ln -sf $(CURDIR)/$(VENV)/bin/versionfs $(DESTDIR)$(PREFIX)/bin/versionfs
	$(SUDO) install -m 755 build/mount.fuse.versionfs $(DESTDIR)$(SBIN)/mount.fuse.versionfs
	$(SUDO) install -m 644 $(addprefix build/,$(UNITS)) $(DESTDIR)$(UNIT_DIR)/
	$(SUDO) install -m 644 systemd/versionfs.env.example $(DESTDIR)$(ETC_DIR)/
	$(SUDO) install -m 644 build/versionfs.bash $(DESTDIR)$(BASH_COMPLETION_DIR)/versionfs
	$(SUDO) install -m 644 build/_versionfs $(DESTDIR)$(ZSH_COMPLETION_DIR)/_versionfs
	$(SUDO) install -m 644 build/versionfs.1 $(DESTDIR)$(MAN_DIR)/versionfs.1
	[ -n "$(DESTDIR)" ] || $(SUDO) systemctl daemon-reload 2>/dev/null || true

# Removes exactly what `make install` put in place (and $(ETC_DIR) if that leaves it empty).
uninstall:
	$(SUDO) rm -f $(INSTALLED)
	-$(SUDO) rmdir $(DESTDIR)$(ETC_DIR) 2>/dev/null
	[ -n "$(DESTDIR)" ] || $(SUDO) systemctl daemon-reload 2>/dev/null || true

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
