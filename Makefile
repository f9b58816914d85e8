# postcopyd — build, test, probe, benchmark, demo, install.
#
#   make test      installs what the tests need (libsystemd-dev; hugepages
#                  and a hugetlbfs mount when root), builds, runs swift test
#   make demo      probes the kernel, then migrates a 1 GiB guest over loopback:
#                  source workload, postcopyd, reference guest, postcopy-push
#                  (HUGETLB=1 for 2 MiB pages on the destination)
#   make check     the capability probe alone
#   make bench     clean-fault cost vs a C baseline; results in bench-results/
#   make install   binaries to $(DESTDIR)$(PREFIX)/bin, units to $(DESTDIR)$(UNITDIR)

PREFIX    ?= /usr/local
UNITDIR   ?= /etc/systemd/system
DESTDIR   ?=
SWIFT     ?= swift
CC        ?= cc
HUGEPAGES ?= 600
DEMO_SIZE ?= 1G
HUGETLB   ?=

RELEASE   := .build/release
PROGRAMS  := postcopyd postcopy-push postcopy-guest postcopy-bench
UNITS     := $(wildcard systemd/*.service)
BASELINE  := benchmarks/baseline/uffd-minor-loop
DEMO_MEMORY := $(if $(HUGETLB),hugetlbfs,shmem)

.PHONY: all build prepare test check demo bench install uninstall clean

all: build

build: prepare
	$(SWIFT) build -c release

prepare:
	@HUGEPAGES=$(HUGEPAGES) bash scripts/prepare-host.sh

test: prepare
	$(SWIFT) build
	$(SWIFT) test

check: build
	$(RELEASE)/postcopyd check $(if $(HUGETLB),--require-hugetlbfs)

demo: build
	$(RELEASE)/postcopyd check $(if $(HUGETLB),--require-hugetlbfs)
	SIZE=$(DEMO_SIZE) MEMORY=$(DEMO_MEMORY) BIN=$(RELEASE) bash scripts/demo-migration.sh

$(BASELINE): $(BASELINE).c
	$(CC) -O2 -Wall -Wextra -pthread -o $@ $<

# Both sides run pinned to one CPU (stable: the fault thread and the toucher
# hand over on one core) and free on two (each fault crosses CPUs: wake-up
# latency of an idle vCPU dominates and varies from run to run).
bench: build $(BASELINE)
	@mkdir -p bench-results
	taskset -c 0 $(RELEASE)/postcopy-bench clean-faults --baseline $(BASELINE) --runs 9 --json bench-results/clean-faults-1cpu.json
	$(RELEASE)/postcopy-bench clean-faults --baseline $(BASELINE) --runs 9 --json bench-results/clean-faults-2cpu.json

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR)
	install -m 0755 $(addprefix $(RELEASE)/,$(PROGRAMS)) $(DESTDIR)$(PREFIX)/bin/
	for unit in $(UNITS); do \
		sed 's|@BINDIR@|$(PREFIX)/bin|g' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
	done

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,$(PROGRAMS))
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))

clean:
	rm -rf .build bench-results $(BASELINE)
