//go:build relaytest

package main

import (
	"fmt"
	"os"
	"strconv"

	"github.com/relaysh/relay/internal/handoff"
)

// The test switches of relay upgrade, built only with the tag relaytest
// (the integration tests build relay so): they make the failures that a
// sound relay never has reachable.

// envFailRestore, set in relay's environment, makes a new image fail its
// restore ("error") or panic in it ("panic") before it takes anything, or
// fail once it has rebuilt the listeners ("after-sockets"), so that the
// tests see the return to the old image. It is removed from the
// environment on the way back.
const envFailRestore = "RELAY_TEST_FAIL_RESTORE"

// envTestAccepts, set to a number, makes relay's answer to an upgrading
// relay's check say it takes only that version of the state, so that the
// tests see an upgrade refused for its version.
const envTestAccepts = "RELAY_TEST_HANDOFF_ACCEPTS"

// failRestore fails or panics as envFailRestore asks, at stage "start"
// or "sockets" of the restore.
func failRestore(stage string) error {
	v := os.Getenv(envFailRestore)
	switch {
	case v == "":
		return nil
	case v == "after-sockets":
		if stage == "sockets" {
			return fmt.Errorf("failing after the listeners as %s asks", envFailRestore)
		}
		return nil
	case stage != "start":
		return nil
	case v == "panic":
		panic(envFailRestore + "=panic")
	default:
		return fmt.Errorf("failing as %s asks", envFailRestore)
	}
}

// checkAccepts are the state versions this image says it takes.
func checkAccepts() []int {
	if v, err := strconv.Atoi(os.Getenv(envTestAccepts)); err == nil {
		return []int{v}
	}
	return handoff.Accepts()
}

// dropOnReturn are the variables the way back removes.
func dropOnReturn() []string { return []string{envFailRestore} }
