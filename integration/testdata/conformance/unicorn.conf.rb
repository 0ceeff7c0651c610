# unicorn's configuration for the conformance suite: two workers. The
# listener is given with --listen.
worker_processes 2
