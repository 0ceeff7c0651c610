package udpsteer

import (
	"testing"
)

// The program's size, and what the verifier made of it.
func TestProgramSize(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("eBPF steering unavailable here: %v", err)
	}
	for _, quic := range []bool{false, true} {
		m, err := newMaps(defaultSlots, 16)
		if err != nil {
			t.Fatal(err)
		}
		prog, insns, err := load(m, programOptions{idle: defaultIdleTimeout, quic: quic, quicIdle: defaultQUICInitialIdle})
		if err != nil {
			m.close()
			t.Fatal(err)
		}
		info, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		verified, _ := info.VerifiedInstructions()
		jited, _ := info.JitedSize()
		xlated, _ := info.TranslatedSize()
		t.Logf("program (QUIC rule %v): %d instructions (%d asm entries, 64-bit loads count twice), %d bytes translated, %d bytes JITed, %d instructions processed by the verifier",
			quic, insns.Size()/insnSize, len(insns), xlated, jited, verified)
		prog.Close()
		m.close()
	}
}
