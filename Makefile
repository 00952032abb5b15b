# Two commands set up a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# ansible-core and ansible-lint for ansible/ and its tests, apart from the project's dependencies.
ANSIBLE_VENV := .venv-ansible
ANSIBLE_STAMP := $(ANSIBLE_VENV)/.installed

.PHONY: run test test-backends test-tools bytecode ansible-tools ansible-lint bench fleet proto lint screenshot clean

# Debian packages some tests drive as real clients (command:package). Installed when missing.
TEST_TOOLS := qemu-img:qemu-utils qemu-io:qemu-utils mkfs.ext4:e2fsprogs debugfs:e2fsprogs curl:curl setpriv:util-linux \
	ip:iproute2 tc:iproute2 faketime:faketime nbdinfo:libnbd-bin nbdcopy:libnbd-bin unshare:util-linux \
	nsenter:util-linux runuser:util-linux pgrep:procps systemctl:systemd chromium:chromium chromedriver:chromium-driver

$(STAMP): pyproject.toml setup.py
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(ANSIBLE_STAMP): ansible/tools-requirements.txt
	test -x $(ANSIBLE_VENV)/bin/python || $(PY) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/pip install -q --upgrade pip
	$(ANSIBLE_VENV)/bin/pip install -q -r ansible/tools-requirements.txt
	touch $(ANSIBLE_STAMP)

ansible-tools: $(ANSIBLE_STAMP)

ansible-lint: $(ANSIBLE_STAMP)
	$(ANSIBLE_VENV)/bin/ansible-playbook --syntax-check -i ansible/inventory/example ansible/site.yml
	cd ansible && PATH=$(CURDIR)/$(ANSIBLE_VENV)/bin:$$PATH ansible-lint --offline --profile production

run: $(STAMP)
	$(BIN)/python -m cachepoint.demo

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
		|| echo "could not install$$missing: the tests that need them will say they were skipped" >&2; \
	fi
	@# tests/postgres.py starts throwaway PostgreSQL servers of its own, as the postgres user the package
	@# makes; the drop-in stops the package from creating (and its service from starting) a main cluster.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "installing postgresql"; \
		mkdir -p /etc/postgresql-common/createcluster.d && echo 'create_main_cluster = false' \
		> /etc/postgresql-common/createcluster.d/no-main-cluster.conf && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } \
		|| echo "could not install postgresql: the PostgreSQL tests will say they were skipped" >&2
	@# The deployment test's services get their venv from the system's Python (ansible/README.md).
	@/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv \
		>/dev/null) || echo "could not install python3-venv: the deployment test will say it was skipped" >&2

# Most tests wait on child processes and the network: three workers keep two cores busy (TEST_WORKERS=0
# runs them in one process).
TEST_WORKERS ?= 3

# The coordinator's own tests (modules marked coordinator_backends) run on both backends, embedded
# and PostgreSQL (TEST_BACKENDS=embedded: one); `make test-backends` runs only those modules. The
# replicas' tests (tests/test_coordinator_replicas.py and friends) always run on PostgreSQL.
TEST_BACKENDS ?= embedded,postgresql
PYTEST = $(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Every test starts daemons and commands as new interpreters: the sources are compiled once here, so
# that none of them compiles them again (with PYTHONDONTWRITEBYTECODE set, each one would).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 cachepoint coordinator bench tests >/dev/null

test: $(STAMP) $(ANSIBLE_STAMP) test-tools bytecode
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	CACHEPOINT_TEST_BACKENDS=$(TEST_BACKENDS) $(PYTEST)

test-backends: $(STAMP) test-tools bytecode
	CACHEPOINT_TEST_BACKENDS=embedded,postgresql $(PYTEST) -m coordinator_backends

# The delta-sync section compares with rsync, the NBD section reads with qemu-img: install them when
# missing (apt-get, as root). Without them the benchmark still runs and marks those parts not measured.
bench: $(STAMP) test-tools bytecode
	command -v rsync >/dev/null || (apt-get update -qq && apt-get install -y -qq rsync) \
		|| echo "could not install rsync: the rsync comparison will be reported as not measured" >&2
	command -v casync >/dev/null || (apt-get update -qq && apt-get install -y -qq casync) \
		|| echo "could not install casync: the casync comparison will be reported as not measured" >&2
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]' \
		|| echo "could not install matplotlib: the site fan-out section will have no plots" >&2
	$(BIN)/python -m bench.run

# A demo fleet in network namespaces (fleetlab/demo.py), as root: SITES sites of NODES cachepoints behind
# WAN links shaped at WAN_RATE, a SIZE version fanned out to them (SITE_FANOUT=false: each node alone).
# The trap removes what the run started even if it was killed before its own cleanup ran.
SITES ?= 2
NODES ?= 3
SIZE ?= 64M
WAN_RATE ?= 100mbit
SITE_FANOUT ?= true

fleet: $(STAMP) test-tools
	@tag=fleet$$$$; \
	trap '$(BIN)/python -m fleetlab.demo --cleanup '"$$tag" EXIT INT TERM HUP; \
	$(BIN)/python -m fleetlab.demo --sites $(SITES) --nodes $(NODES) --size $(SIZE) \
		--wan-rate $(WAN_RATE) --site-fanout $(SITE_FANOUT) --tag $$tag

# docs/dashboard.png, taken by the dashboard's browser test of a live test fleet.
screenshot: $(STAMP) test-tools
	CACHEPOINT_DASHBOARD_SCREENSHOT=$(CURDIR)/docs/dashboard.png $(BIN)/python -m pytest -q tests/test_dashboard_browser.py

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/cachepoint/v1/*.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) build *.egg-info
