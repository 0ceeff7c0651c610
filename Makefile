# make bench runs the restart-under-load benchmark (about 11 minutes on 2
# cores, plus 1000 times relay's drain for the memory run); pass flags
# through BENCH_FLAGS, e.g.
#   make bench BENCH_FLAGS="--duration 2m --restarts 40"
# and see "go run ./bench --help" for all of them.
GO ?= go
BENCH_FLAGS ?=

# The tags of the lean build: see the relay target.
RELAY_TAGS = nethttpomithttp2,urfave_cli_no_docs

.PHONY: relay test bench demo package
# relay builds the binary as the README says: without cgo (relay needs no C
# library) and without what it never runs (net/http's HTTP/2, urfave/cli's
# man page writer): 2.6 MiB less resident memory than a plain go build.
relay:
	CGO_ENABLED=0 $(GO) build -tags $(RELAY_TAGS) -o relay ./cmd/relay

test:
	$(GO) test -race -count=1 -timeout 30m ./...

bench:
	$(GO) run ./bench $(BENCH_FLAGS)

demo:
	$(GO) run ./examples/demo

# make package builds the Debian package $(DIST)/relay_VERSION_ARCH.deb
# (docs/install.md): relay built as the relay target builds it, for GOARCH
# (this machine's unless set), with the version and commit the Go toolchain
# stamps from git (-buildvcs=auto: relay version prints them), and the
# package version made from that version (packaging/debversion), unless
# DEB_VERSION is given; the man pages and completion scripts, written by a
# plain build of relay from its command definitions; the units of
# examples/systemd with relay at /usr/bin/relay. All of it is put together
# in $(PKG_BUILD), which is removed first, and packaged by nfpm
# (packaging/nfpm.yaml), a build tool only, run at a fixed version and not
# a dependency of relay's module.
GOARCH ?= $(shell $(GO) env GOARCH)
PKG_BUILD ?= build/package
DIST ?= dist
DEB_VERSION ?=
DEB_MAINTAINER ?= relay maintainers <maintainers@relay.invalid>
NFPM = $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0
# The tools that run here are built for here, whatever GOARCH says.
HOST = GOOS= GOARCH=

package:
	rm -rf $(PKG_BUILD)
	mkdir -p $(PKG_BUILD)/man $(PKG_BUILD)/completions $(PKG_BUILD)/systemd $(PKG_BUILD)/tools $(DIST)
	CGO_ENABLED=0 GOOS=linux GOARCH=$(GOARCH) $(GO) build -buildvcs=auto -tags $(RELAY_TAGS) -o $(PKG_BUILD)/relay ./cmd/relay
	$(HOST) $(GO) build -o $(PKG_BUILD)/tools/relay ./cmd/relay
	$(PKG_BUILD)/tools/relay __man $(PKG_BUILD)/man
	gzip -9n $(PKG_BUILD)/man/*.1
	$(PKG_BUILD)/tools/relay completion bash >$(PKG_BUILD)/completions/relay.bash
	$(PKG_BUILD)/tools/relay completion zsh >$(PKG_BUILD)/completions/_relay
	$(PKG_BUILD)/tools/relay completion fish >$(PKG_BUILD)/completions/relay.fish
	for unit in relay.service relay.socket relay@.service; do \
	  sed 's|/usr/local/bin/relay |/usr/bin/relay |g' examples/systemd/$$unit >$(PKG_BUILD)/systemd/$$unit || exit 1; \
	done
	@if grep -n '/usr/local/bin/relay' $(PKG_BUILD)/systemd/*; then \
	  echo "make package: relay's path left unchanged in a unit above" >&2; exit 1; \
	fi
	version='$(DEB_VERSION)'; \
	if [ -z "$$version" ]; then version=$$($(HOST) $(GO) run ./packaging/debversion $(PKG_BUILD)/relay) || exit 1; fi; \
	$(HOST) $(GO) run ./packaging/debversion -changelog '$(DEB_MAINTAINER)' -version "$$version" $(PKG_BUILD)/relay >$(PKG_BUILD)/changelog || exit 1; \
	gzip -9n $(PKG_BUILD)/changelog || exit 1; \
	RELAY_PKG_VERSION="$$version" RELAY_PKG_ARCH='$(GOARCH)' RELAY_PKG_BUILD='$(PKG_BUILD)' RELAY_PKG_MAINTAINER='$(DEB_MAINTAINER)' \
	  $(HOST) $(NFPM) package --config packaging/nfpm.yaml --packager deb --target $(DIST)/
