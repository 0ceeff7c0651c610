//go:build !relaytest

package main

import "github.com/relaysh/relay/internal/handoff"

// Without the tag relaytest, relay has no test switch (testswitch.go).

func failRestore(string) error { return nil }
func checkAccepts() []int      { return handoff.Accepts() }
func dropOnReturn() []string   { return nil }
