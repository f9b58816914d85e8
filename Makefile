# postcopyd — build, test, probe, benchmark, demo, install.
#
#   make test      installs what the tests need (libsystemd-dev, libssl-dev,
#                  openssl; hugepages, a hugetlbfs mount, a journald and the
#                  journal catalog when root), builds, runs swift test (the
#                  fuzz regressions among them), 8 concurrent migrations
#                  (make test-load), the preload adapter (make test-preload,
#                  and 20 s of fuzzing its codec: make test-fuzz-adapter),
#                  a real QEMU guest (make test-qemu), then the systemd-nspawn
#                  test (root only: a real systemd runs postcopyd@test)
#   make test-sanitizers  swift test under ASan and TSan (~25 min on 2 cores)
#   make demo      probes the kernel, then migrates a 1 GiB guest over loopback
#                  (postcopy-bench demo): source workload, postcopyd, reference
#                  guest, postcopyctl watch, postcopy-push (HUGETLB=1 for 2 MiB
#                  pages on the destination, DEMO_SIZE= for another size)
#   make check     the capability probe alone
#   make bench     every benchmark against a baseline measured in the same run
#                  (root; over 10 min); table, bench.json and plots in bench-results/
#                  (BENCH_FLAGS=--quick for a short smoke run)
#   make bench-streams  precopy over 1 and 2 bulk streams (--streams), 1 GiB,
#                  plaintext and TLS, medians of 3 (root)
#   make load      8 migrations of 256 MiB (10 % dirty) at once over loopback,
#                  each with its own source, postcopyd, reference guest and
#                  agent (root); per-instance times, daemon peak memory, JSON
#                  (LOAD_N=, LOAD_SIZE=, LOAD_DIRTY= to change)
#   make test-load the same with 8 × 32 MiB on the debug build, building
#                  nothing (for make test; skips when not root)
#   make test-qemu a real QEMU guest (Debian's kernel, a self-verifying
#                  workload) migrated onto postcopyd through the preload
#                  adapter (in both QEMUs: the source's uffd-wp log, checked
#                  page by page), switched over by postcopy-push --qmp, on
#                  shmem, on hugetlbfs, with postcopyd killed and taken
#                  over, and with a switchover that fails before RESUMED
#                  (root; installs QEMU)
#   make test-preload  the adapter against a real postcopyd, without QEMU
#   make preload   libpostcopy-vmm.so, the adapter that puts an unmodified
#                  VMM on postcopyd (LD_PRELOAD), in .build/preload/
#   make install   the operator's programs (postcopyd, postcopy-push, postcopyctl)
#                  to $(DESTDIR)$(PREFIX)/bin, libpostcopy-vmm.so to
#                  $(DESTDIR)$(LIBDIR), units (.service, .socket) to $(DESTDIR)$(UNITDIR),
#                  the journal catalog, an example config, the docs
#   make uninstall removes what install put there (never a config you wrote)

PREFIX    ?= /usr/local
UNITDIR   ?= /etc/systemd/system
CONFDIR   ?= /etc/postcopyd
CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog
DOCDIR    ?= $(PREFIX)/share/doc/postcopyd
LIBDIR    ?= $(PREFIX)/lib/postcopyd
DESTDIR   ?=
SWIFT     ?= swift
CC        ?= cc
HUGEPAGES ?= 600
DEMO_SIZE ?= 1G
HUGETLB   ?=

RELEASE   := .build/release
# What an operator runs on a host, and what make install installs; the test
# tools (the reference guest and source workload, the benchmarks) stay in
# $(RELEASE) and run from the tree (docs/operations.md, "Installing").
PROGRAMS  := postcopyd postcopy-push postcopyctl
TEST_TOOLS := postcopy-guest postcopy-bench
UNITS     := $(wildcard systemd/*.service) $(wildcard systemd/*.socket)
DOCS      := README.md $(wildcard docs/*.md)
BASELINES := $(addprefix benchmarks/baseline/,uffd-minor-loop tcp-pingpong tcp-stream precopy-stream)
BENCH_FLAGS ?=
LOAD_N     ?= 8
LOAD_SIZE  ?= 256M
LOAD_DIRTY ?= 0.10
DEMO_MEMORY := $(if $(HUGETLB),hugetlbfs,shmem)

.PHONY: all build prepare test check demo bench bench-streams install uninstall clean preload test-preload test-qemu

all: build

build: prepare preload
	$(SWIFT) build -c release

# The adapter runs inside the VMM, so it is C and links nothing but libc.
# Its numbers are the wire's definition, postcopy_wire.h in CPostcopy.
PRELOAD_LIB := .build/preload/libpostcopy-vmm.so
WIRE_H      := Sources/CPostcopy/include/postcopy_wire.h
preload: $(PRELOAD_LIB)
$(PRELOAD_LIB): preload/postcopy-vmm.c preload/vmm-codec.h $(WIRE_H)
	@mkdir -p $(dir $@)
	$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -pthread -I Sources/CPostcopy/include -o $@ $< -ldl

# The adapter against a real postcopyd, without QEMU: what it leaves alone
# and what it refuses (root; skips otherwise).
test-preload: preload
	BIN=.build/debug bash Tests/Integration/adapter/adapter-test.sh

# The whole QEMU flow on the debug build (qemu/test.sh; qemu/migrate.sh
# runs one migration with your settings).
test-qemu: preload
	BIN=.build/debug bash qemu/test.sh

prepare:
	@HUGEPAGES=$(HUGEPAGES) bash scripts/prepare-host.sh

test: prepare
	$(SWIFT) build
	$(SWIFT) test
	$(MAKE) test-load
	$(MAKE) test-preload
	$(MAKE) test-fuzz-adapter
	$(MAKE) test-qemu
	BIN=.build/debug bash Tests/Integration/systemd/test-systemd-nspawn.sh

# The whole test suite again under AddressSanitizer (with LeakSanitizer) and
# under ThreadSanitizer, each in a build folder of its own, with the
# timing-sensitive tests' timeouts stretched (POSTCOPY_TEST_TIME_SCALE). Under
# TSan the 256 MiB whole migrations run at 32 MiB (POSTCOPY_TEST_SIZE_SCALE=8)
# and the tests one at a time (--no-parallel): two migrations at once on a
# small machine starve each other's TLS handshakes and heartbeats. About 25
# minutes on 2 cores, builds included (see docs/benchmarks.md), so not part
# of make test.
.PHONY: test-sanitizers
test-sanitizers: prepare
	POSTCOPY_TEST_TIME_SCALE=4 LSAN_OPTIONS=suppressions=$(CURDIR)/scripts/lsan.supp \
		$(SWIFT) test --sanitize=address --scratch-path .build-asan
	POSTCOPY_TEST_TIME_SCALE=6 POSTCOPY_TEST_SIZE_SCALE=8 \
		$(SWIFT) test --sanitize=thread --scratch-path .build-tsan --no-parallel

# The real postcopyd@.service under a real systemd (PID 1 of a systemd-nspawn
# container booted from a cached Debian root), with a whole migration into it.
# Root only (skips otherwise); installs systemd-container and debootstrap.
.PHONY: test-systemd
test-systemd: build
	bash Tests/Integration/systemd/test-systemd-nspawn.sh

check: build
	$(RELEASE)/postcopyd check $(if $(HUGETLB),--require-hugetlbfs)

demo: build
	$(RELEASE)/postcopyd check $(if $(HUGETLB),--require-hugetlbfs)
	$(RELEASE)/postcopy-bench demo --size $(DEMO_SIZE) --memory $(DEMO_MEMORY) --bin $(RELEASE)

benchmarks/baseline/%: benchmarks/baseline/%.c benchmarks/baseline/baseline.h
	$(CC) -O2 -Wall -Wextra -pthread -o $@ $<

# The one baseline that speaks TLS (OpenSSL, as the daemon).
benchmarks/baseline/precopy-stream: benchmarks/baseline/precopy-stream.c benchmarks/baseline/baseline.h
	$(CC) -O2 -Wall -Wextra -pthread -o $@ $< -lssl -lcrypto

# The benchmarks and their baselines; docs/benchmarks.md says what each
# measures. Root only (userfaultfd, hugetlbfs).
bench: build $(BASELINES)
	$(RELEASE)/postcopy-bench run --out bench-results $(BENCH_FLAGS)

# Precopy's round 1 over 1 and 2 bulk streams (postcopy-push --streams),
# 1 GiB, plaintext and TLS, medians of 3 and the ratios to one stream
# (docs/benchmarks.md, "Precopy over bulk streams"). Root only.
bench-streams: build
	$(RELEASE)/postcopy-bench streams --size 1G --streams 1,2 --runs 3 --work bench-results/streams

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(CATALOGDIR) $(DESTDIR)$(DOCDIR)
	install -m 0755 $(addprefix $(RELEASE)/,$(PROGRAMS)) $(DESTDIR)$(PREFIX)/bin/
	for unit in $(UNITS); do \
		sed -e 's|@BINDIR@|$(PREFIX)/bin|g' -e 's|@DOCDIR@|$(DOCDIR)|g' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
	done
	install -m 0644 systemd/example.conf $(DESTDIR)$(CONFDIR)/example.conf.sample
	install -m 0644 systemd/postcopyd.catalog $(DESTDIR)$(CATALOGDIR)/postcopyd.catalog
	install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(LIBDIR)
	install -m 0755 $(PRELOAD_LIB) $(DESTDIR)$(LIBDIR)/
	@if [ -z "$(DESTDIR)" ]; then \
		journalctl --update-catalog || true; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
		echo "installed: write $(CONFDIR)/NAME.conf (see example.conf.sample), then 'systemctl start postcopyd@NAME'"; \
		echo "           (or, socket-activated, the agent's port in a drop-in and 'systemctl start postcopyd@NAME.socket': docs/operations.md)"; \
	fi

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,$(PROGRAMS) $(TEST_TOOLS))
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))
	rm -f $(DESTDIR)$(CONFDIR)/example.conf.sample $(DESTDIR)$(CATALOGDIR)/postcopyd.catalog
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(DOCS)))
	rm -f $(DESTDIR)$(LIBDIR)/libpostcopy-vmm.so
	-rmdir $(DESTDIR)$(DOCDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(LIBDIR) 2>/dev/null
	@if [ -z "$(DESTDIR)" ]; then \
		journalctl --update-catalog || true; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi

# N migrations at once on this machine over loopback (postcopy-bench load).
# Root only; refuses when N × SIZE × 2 does not fit in MemAvailable.
.PHONY: load test-load
load: build
	$(RELEASE)/postcopy-bench load --instances $(LOAD_N) --size $(LOAD_SIZE) --dirty $(LOAD_DIRTY) --bin $(RELEASE)

# The same at sizes make test can afford, on the debug build it has built.
test-load:
	.build/debug/postcopy-bench load --skip-unless-root --instances 8 --size 32M --dirty 0.10 --bin .build/debug

# Fuzzing (docs/fuzzing.md). fuzz: every decoder under libFuzzer and
# AddressSanitizer for FUZZ_SECONDS each (scripts/fuzz.sh; built in
# .build-fuzz, results in fuzz-results/, exit 1 on a crash). fuzz-seed:
# regenerates the seed corpus fuzz/corpus/ from the encoders, after a
# protocol change.
FUZZ_SECONDS ?= 60
.PHONY: fuzz fuzz-seed fuzz-adapter test-fuzz-adapter
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) SWIFT=$(SWIFT) bash scripts/fuzz.sh

# fuzz-adapter: the preload adapter's C codec alone (the target `adapter`),
# FUZZ_ADAPTER_SECONDS under libFuzzer, ASan and UBSan, built with the clang
# that comes with swift. test-fuzz-adapter: the same for 20 s, for make
# test, where a missing libFuzzer is said and skipped rather than failed.
FUZZ_ADAPTER_SECONDS ?= 30
fuzz-adapter:
	FUZZ_TARGETS=adapter FUZZ_SECONDS=$(FUZZ_ADAPTER_SECONDS) SWIFT=$(SWIFT) bash scripts/fuzz.sh

test-fuzz-adapter:
	FUZZ_ADAPTER_OPTIONAL=1 FUZZ_TARGETS=adapter FUZZ_SECONDS=20 SWIFT=$(SWIFT) bash scripts/fuzz.sh

fuzz-seed:
	$(SWIFT) build --scratch-path .build-fuzz --product postcopy-fuzz
	rm -rf fuzz/corpus
	.build-fuzz/debug/postcopy-fuzz seed fuzz/corpus

clean:
	rm -rf .build .build-fuzz bench-results fuzz-results $(BASELINES)
