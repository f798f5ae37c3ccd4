# meshlens — the two commands a user needs: `make run` and `make test`.
# Every target is idempotent: stamps and file dependencies make a second run fast.

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMPS     := .build
BPF_SRC    := $(wildcard bpf/*.bpf.c)
BPF_HDR    := $(wildcard bpf/include/*.h)
BPF_OBJDIR := agent/bpfobj
BPF_OBJ    := $(patsubst bpf/%.bpf.c,$(BPF_OBJDIR)/%.bpf.o,$(BPF_SRC))
ARCH       := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
CLANG      ?= clang
BPF_CFLAGS := -O2 -g -target bpf -D__TARGET_ARCH_$(ARCH) -Ibpf/include -Wall -Werror

# Debian packages: build (clang, libbpf), runtime (libbpf1, iproute2), and the real servers,
# clients and tools the integration tests and benchmarks drive; qemu, busybox and kmod boot
# the kernel-matrix guest (Debian's 6.1 kernel, tests/kernel_matrix).
APT_PKGS := clang llvm libbpf-dev libbpf1 bpftool iproute2 iptables nginx-light iperf3 \
            dnsmasq-base wrk prometheus curl python3-venv procps bpfcc-tools \
            iputils-ping qemu-system-x86 busybox-static kmod chromium

METRICS_ADDR ?= 127.0.0.1:9433
PYTEST_ARGS  ?=

.PHONY: all run test unit integration kernel-matrix lint-imports bench deps mounts bpf vmlinux clean

all: deps bpf mounts

run: all
	$(VENV)/bin/meshlens run --metrics-addr $(METRICS_ADDR)

test: all lint-imports
	$(PY) -m pytest -p no:cacheprovider tests $(PYTEST_ARGS)

# The one direction of imports (.importlinter, docs/architecture.md); fails on a broken contract.
lint-imports: deps
	$(VENV)/bin/lint-imports --no-cache

unit: deps bpf
	$(PY) -m pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

integration: all
	$(PY) -m pytest -p no:cacheprovider tests/integration $(PYTEST_ARGS)

# The same build on the host's kernel and on Debian's 6.1 under qemu (also part of `make test`);
# the side-by-side record lands in .build/kernel-matrix.txt.
kernel-matrix: all
	$(PY) -m pytest -p no:cacheprovider tests/kernel_matrix $(PYTEST_ARGS)

deps: $(STAMPS)/apt.stamp $(STAMPS)/venv.stamp

# Install only the packages that are missing, so the second run costs one dpkg query.
$(STAMPS)/apt.stamp: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/venv.stamp: setup.py $(STAMPS)/apt.stamp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

bpf: $(BPF_OBJ)

$(BPF_OBJDIR)/%.bpf.o: bpf/%.bpf.c $(BPF_HDR) $(STAMPS)/apt.stamp
	@mkdir -p $(BPF_OBJDIR)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# tracefs and bpffs are needed by libbpf (tracepoint ids) and for pins; mount when missing.
mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Regenerate the committed vmlinux.h from this machine's kernel BTF (not part of the build).
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/include/vmlinux.h

bench: all
	$(PY) -m bench.run

clean:
	rm -rf $(BPF_OBJDIR) $(STAMPS) build *.egg-info
