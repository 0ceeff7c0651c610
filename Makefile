# make bench runs the restart-under-load benchmark (about 11 minutes on 2
# cores, plus 1000 times relay's drain for the memory run); pass flags
# through BENCH_FLAGS, e.g.
#   make bench BENCH_FLAGS="--duration 2m --restarts 40"
# and see "go run ./bench --help" for all of them.
GO ?= go
BENCH_FLAGS ?=

.PHONY: relay test bench demo
# relay builds the binary as the README says: without cgo (relay needs no C
# library) and without what it never runs (net/http's HTTP/2, urfave/cli's
# man page writer): 2.6 MiB less resident memory than a plain go build.
relay:
	CGO_ENABLED=0 $(GO) build -tags nethttpomithttp2,urfave_cli_no_docs -o relay ./cmd/relay

test:
	$(GO) test -race -count=1 -timeout 30m ./...

bench:
	$(GO) run ./bench $(BENCH_FLAGS)

demo:
	$(GO) run ./examples/demo
