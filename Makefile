# The two user-facing commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := iptables nftables conntrack iproute2 libnetfilter-queue-dev libnetfilter-queue1 \
	gcc python3-dev python3-venv pkgconf tcpdump iputils-ping procps bird2
BENCH_PACKAGES := netsniff-ng wrk nginx-light
# The container image test and the systemd unit test (they skip, saying why, without these).
TEST_PACKAGES := podman runc debootstrap systemd
.PHONY: all deps test-deps bench-deps venv proto lint typecheck unit netns test demo bench \
	manifests clean

all: test

# Debian packages for the data path, for building NetfilterQueue, and bird2 for the LB's BGP
# frontend (each LB runs its own BIRD as a child, in its own namespace). policy-rc.d keeps the
# packages' services from starting on the host, as in bench-deps. Should a bird2 installed here
# have started the package's BIRD anyway (a host policy-rc.d that allows it), that one is
# stopped: only the bird listening on the package's control socket /run/bird/bird.ctl in this
# network namespace, never the BIRDs of labs and tests (the sysvinit script's stop and
# `pkill -x bird` would stop those too: both go by name).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		made=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; rc=$$?; \
		[ -n "$$made" ] && rm -f /usr/sbin/policy-rc.d; \
		case " $$missing " in *" bird2 "*) if [ -S /run/bird/bird.ctl ]; then \
			pids=""; for pid in $$(ss -xlpH src /run/bird/bird.ctl | grep -o 'pid=[0-9]*' | cut -d= -f2); do \
				pgrep -x bird | grep -qx "$$pid" && pids="$$pids $$pid"; done; \
			if [ -n "$$pids" ]; then echo "stopping the BIRD the bird2 package started:$$pids"; \
				{ [ -d /run/systemd/system ] && invoke-rc.d bird stop; } || kill $$pids; fi; \
		fi;; esac; \
		exit $$rc; \
	fi

$(STAMP): pyproject.toml | deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: deps $(STAMP)

# Regenerate the committed betterproto code from proto/.
proto: venv
	$(PY) -m meridio.tools.protogen src/meridio/api

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q -m "not netns and not slow"

netns: venv
	$(VENV)/bin/pytest -q -m netns

test-deps:
	@missing=""; for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: venv test-deps lint typecheck
	$(VENV)/bin/pytest -q

# The TAPA lab end to end alone (it is part of `make test` too).
test-lab-tapa: venv
	$(VENV)/bin/pytest -q -m lab_tapa

# Render the Kubernetes manifests from config/kubernetes/values.yaml.
manifests: venv
	$(VENV)/bin/meridioctl manifest config/kubernetes/values.yaml --output-dir config/kubernetes/trench-a

# Load generators and servers for the data-path benchmark (trafgen comes with netsniff-ng).
# policy-rc.d keeps the packages' own services (nginx) from starting on the host: the benchmark
# runs its servers in its own namespaces only.
bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		made=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; rc=$$?; \
		[ -n "$$made" ] && rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

bench: venv bench-deps
	$(PY) -m bench

demo: venv
	$(VENV)/bin/meridioctl demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
