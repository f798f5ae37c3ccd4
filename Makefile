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
# the kernel-matrix guest (Debian's 6.1 kernel, tests/kernel_matrix); podman and its helpers
# build and run the container image (daemonset/Containerfile).
APT_PKGS := clang llvm libbpf-dev libbpf1 bpftool iproute2 iptables nginx-light iperf3 \
            dnsmasq-base wrk prometheus curl python3-venv procps bpfcc-tools \
            iputils-ping qemu-system-x86 busybox-static kmod podman runc catatonit conmon \
            containernetworking-plugins debootstrap uidmap chromium bind9-dnsutils

METRICS_ADDR ?= 127.0.0.1:9433
PYTEST_ARGS  ?=

.PHONY: all run test unit integration kernel-matrix lint-imports bench deps mounts bpf proto vmlinux clean image base-image podman-conf

all: deps bpf proto mounts podman-conf

run: all
	$(VENV)/bin/meshlens run --metrics-addr $(METRICS_ADDR)

test: all lint-imports
	$(PY) -m pytest -p no:cacheprovider tests $(PYTEST_ARGS)

# The one direction of imports (.importlinter, docs/architecture.md); fails on a broken contract.
lint-imports: deps
	$(VENV)/bin/lint-imports --no-cache

unit: deps bpf proto
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
	$(PY) -m pip install -q -e '.[test,build]'
	@touch $@

bpf: $(BPF_OBJ)

# The Observer's Python modules, generated from exporter/proto/observer.proto by grpcio-tools
# (not committed). protoc writes `import observer_pb2`; the package needs a relative import.
PROTO_SRC := exporter/proto/observer.proto
PROTO_GEN := exporter/proto/observer_pb2.py exporter/proto/observer_pb2_grpc.py
PROTOC    ?= $(PY) -m grpc_tools.protoc

proto: $(PROTO_GEN)

$(PROTO_GEN) &: $(PROTO_SRC) $(if $(MESHLENS_NO_APT),,$(STAMPS)/venv.stamp)
	$(PROTOC) -Iexporter/proto --python_out=exporter/proto --pyi_out=exporter/proto --grpc_python_out=exporter/proto $(PROTO_SRC)
	sed -i 's/^import observer_pb2 as/from . import observer_pb2 as/' exporter/proto/observer_pb2_grpc.py

# Inside the image build (MESHLENS_NO_APT=1) the Containerfile has installed the compiler itself.
APT_STAMP := $(if $(MESHLENS_NO_APT),,$(STAMPS)/apt.stamp)

$(BPF_OBJDIR)/%.bpf.o: bpf/%.bpf.c $(BPF_HDR) $(APT_STAMP)
	@mkdir -p $(BPF_OBJDIR)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# The packet L7 objects lock a connection with compare-and-swap (bpf/include/l7pkt_core.h),
# an instruction of BPF ISA v3 (kernel 5.12+; the packet path needs bpf_loop, 5.17, anyway).
$(BPF_OBJDIR)/l7pkt.bpf.o $(BPF_OBJDIR)/l7cg.bpf.o: BPF_CFLAGS += -mcpu=v3

# tracefs and bpffs are needed by libbpf (tracepoint ids) and for pins; mount when missing.
mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Regenerate the committed vmlinux.h from this machine's kernel BTF (not part of the build).
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/include/vmlinux.h

# ---- container image (daemonset/Containerfile), built with podman -------------------------
# podman on these machines: runc (crun refuses the hybrid cgroup layout) and explicit
# rlimits (the sandbox's bounding set lacks CAP_SYS_RESOURCE, so podman's defaults fail).
# A drop-in file, rewritten only when its content differs.
PODMAN_CONF := /etc/containers/containers.conf.d/50-meshlens.conf
define PODMAN_CONF_TEXT
# written by meshlens' Makefile (make podman-conf)
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
endef
export PODMAN_CONF_TEXT

podman-conf: $(STAMPS)/apt.stamp
	@mkdir -p $(dir $(PODMAN_CONF))
	@printf '%s\n' "$$PODMAN_CONF_TEXT" | cmp -s - $(PODMAN_CONF) || \
	    { printf '%s\n' "$$PODMAN_CONF_TEXT" > $(PODMAN_CONF); echo "wrote $(PODMAN_CONF)"; }

# No registry is reachable: the base image is Debian's minbase from debootstrap, imported
# into podman. The root filesystem tarball is cached outside the repo, keyed by what made it.
IMAGE        ?= localhost/meshlens:0.1.0
DEB_SUITE    := bookworm
DEB_MIRROR   ?= http://deb.debian.org/debian
BASE_KEY     := $(DEB_SUITE)-minbase-$(shell dpkg --print-architecture 2>/dev/null || echo amd64)
BASE_IMAGE   := localhost/meshlens-base:$(BASE_KEY)
IMAGE_CACHE  ?= /var/cache/meshlens
BASE_TAR     := $(IMAGE_CACHE)/base-$(BASE_KEY).tar

$(BASE_TAR): | $(STAMPS)/apt.stamp
	@mkdir -p $(IMAGE_CACHE)
	@rm -rf $(IMAGE_CACHE)/rootfs.tmp
	debootstrap --variant=minbase $(DEB_SUITE) $(IMAGE_CACHE)/rootfs.tmp $(DEB_MIRROR) > $(IMAGE_CACHE)/debootstrap.log 2>&1 \
	    || { tail -20 $(IMAGE_CACHE)/debootstrap.log; exit 1; }
	rm -rf $(IMAGE_CACHE)/rootfs.tmp/var/cache/apt/archives/*.deb $(IMAGE_CACHE)/rootfs.tmp/var/lib/apt/lists/*
	tar -C $(IMAGE_CACHE)/rootfs.tmp --numeric-owner -cf $@.tmp . && mv $@.tmp $@
	rm -rf $(IMAGE_CACHE)/rootfs.tmp

base-image: podman-conf $(BASE_TAR)
	@podman image exists $(BASE_IMAGE) || podman import \
	    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
	    --change "CMD /bin/bash" $(BASE_TAR) $(BASE_IMAGE)

# podman's layer cache makes a rebuild with unchanged sources take seconds. apt inside the
# build needs the host's network (no CNI set-up is assumed).
HOST_CA      ?= /etc/ssl/certs/ca-certificates.crt

image: base-image
	podman build --network=host --layers --build-arg BASE=$(BASE_IMAGE) \
	    $(if $(wildcard $(HOST_CA)),--volume $(HOST_CA):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt) \
	    -f daemonset/Containerfile -t $(IMAGE) .

bench: all
	$(PY) -m bench.run

clean:
	rm -rf $(BPF_OBJDIR) $(STAMPS) build *.egg-info exporter/proto/*_pb2*.py*
