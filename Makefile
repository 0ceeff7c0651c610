# make bench runs the restart-under-load benchmark (about 11 minutes on 2
# cores, plus 1000 times relay's drain for the memory run); pass flags
# through BENCH_FLAGS, e.g.
#   make bench BENCH_FLAGS="--duration 2m --restarts 40"
# and see "go run ./bench --help" for all of them.
GO ?= go
BENCH_FLAGS ?=

.PHONY: test bench demo
test:
	$(GO) test -race -count=1 -timeout 30m ./...

bench:
	$(GO) run ./bench $(BENCH_FLAGS)

demo:
	$(GO) run ./examples/demo
