package kubernetes_test

import (
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// dockerfilePath is the image the Deployment runs.
const dockerfilePath = "../container/Dockerfile"

// repoRoot is the build context of the Dockerfile.
const repoRoot = "../.."

// instruction is one instruction of a Dockerfile: its keyword, upper
// case, and the rest of its (joined) lines.
type instruction struct{ op, arg string }

// stage is a FROM of a Dockerfile and the instructions that follow it.
type stage struct {
	from string
	ins  []instruction
}

// readDockerfile splits the Dockerfile into stages; continuation lines
// are joined and comments dropped.
func readDockerfile(t *testing.T) []stage {
	t.Helper()
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	var stages []stage
	var cur strings.Builder
	for line := range strings.Lines(string(data)) {
		line = strings.TrimRight(line, "\r\n")
		if cur.Len() == 0 && (strings.HasPrefix(strings.TrimSpace(line), "#") || strings.TrimSpace(line) == "") {
			continue
		}
		if l, ok := strings.CutSuffix(line, `\`); ok {
			cur.WriteString(l)
			continue
		}
		cur.WriteString(line)
		op, arg, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
		cur.Reset()
		in := instruction{strings.ToUpper(op), strings.TrimSpace(arg)}
		if in.op == "FROM" {
			stages = append(stages, stage{from: in.arg})
			continue
		}
		if len(stages) == 0 {
			t.Fatalf("%s: %s before the first FROM", dockerfilePath, in.op)
		}
		stages[len(stages)-1].ins = append(stages[len(stages)-1].ins, in)
	}
	if len(stages) < 2 {
		t.Fatalf("%s has %d stages, want a build stage and a final one", dockerfilePath, len(stages))
	}
	return stages
}

// all returns the arguments of every instruction op of the stage.
func (s stage) all(op string) []string {
	var out []string
	for _, in := range s.ins {
		if in.op == op {
			out = append(out, in.arg)
		}
	}
	return out
}

// execForm decodes an instruction in exec (JSON array) form.
func execForm(t *testing.T, op, arg string) []string {
	t.Helper()
	var v []string
	if err := json.Unmarshal([]byte(arg), &v); err != nil || len(v) == 0 {
		t.Fatalf("%s %s: want the exec form, a JSON array (so that relay is PID 1, not a shell): %v", op, arg, err)
	}
	return v
}

// shellWords splits a RUN command of words and quoted strings; it
// refuses shell operators, which this test would not run as a shell does.
func shellWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord, quote := false, rune(0)
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words, inWord = append(words, w.String()), false
				w.Reset()
			}
		case strings.ContainsRune("&|;<>$`", r):
			return nil, fmt.Errorf("RUN %s: %q is for a shell; keep each go build a plain command", s, r)
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("RUN %s: unterminated quote", s)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// builtImage is what the build stage's go build commands made, run here
// as the Dockerfile runs them: out maps each image path (-o) to the file
// built here.
type builtImage struct {
	out map[string]string
	err error
}

// runBuildStage runs the build stage's go build commands, in the build
// context with the stage's ENV, writing what they build under dir.
func runBuildStage(s stage, dir string) builtImage {
	b := builtImage{out: map[string]string{}}
	env := os.Environ()
	for _, e := range s.all("ENV") {
		for _, kv := range strings.Fields(e) {
			if !strings.Contains(kv, "=") {
				b.err = fmt.Errorf("ENV %s: want KEY=VALUE", e)
				return b
			}
			env = append(env, kv)
		}
	}
	for _, run := range s.all("RUN") {
		w, err := shellWords(run)
		if err != nil {
			b.err = err
			return b
		}
		if len(w) < 2 || w[0] != "go" || w[1] != "build" {
			continue // go mod download: the modules are here already
		}
		o := slices.Index(w, "-o")
		if o < 0 || o+1 == len(w) || !path.IsAbs(w[o+1]) {
			b.err = fmt.Errorf("RUN %s: want -o /ABSOLUTE/PATH", run)
			return b
		}
		image := w[o+1]
		local := filepath.Join(dir, filepath.FromSlash(image))
		w[o+1] = local
		cmd := exec.Command(w[0], w[1:]...)
		cmd.Dir, cmd.Env = repoRoot, env
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("RUN %s: %w\n%s", run, err, out)
			return b
		}
		b.out[image] = local
	}
	return b
}

// finalStage is the image's stage and what it copies from the build: the
// path of each file in the image, to the path the build stage gave it.
func finalStage(t *testing.T) (stage, map[string]string) {
	t.Helper()
	stages := readDockerfile(t)
	final := stages[len(stages)-1]
	copied := map[string]string{}
	for _, c := range final.all("COPY") {
		w := strings.Fields(c)
		if len(w) < 3 || !strings.HasPrefix(w[0], "--from=") {
			continue
		}
		srcs, dst := w[1:len(w)-1], w[len(w)-1]
		for _, src := range srcs {
			to := dst
			if strings.HasSuffix(dst, "/") {
				to = path.Join(dst, path.Base(src))
			}
			copied[to] = src
		}
	}
	return final, copied
}

// TestImageBuild runs the Dockerfile's build commands here (no container
// engine runs where these tests do), once, and checks what they make.
func TestImageBuild(t *testing.T) {
	b := runBuildStage(readDockerfile(t)[0], t.TempDir())
	if b.err != nil {
		t.Fatal(b.err)
	}
	t.Run("static", func(t *testing.T) { checkStatic(t, b) })
	t.Run("flags", func(t *testing.T) { checkFlags(t, b) })
}

// checkStatic checks the build: static executables, without cgo, and a
// relay that links no Kubernetes module (k8s.io/api is only these tests'
// requirement).
func checkStatic(t *testing.T, b builtImage) {
	if len(b.out) < 2 {
		t.Fatalf("the build stage built %v: want relay and the server", b.out)
	}
	for image, local := range b.out {
		f, err := elf.Open(local)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
				t.Errorf("%s has a %s program header: not static, it needs a libc the image has not", image, p.Type)
			}
		}
		f.Close()
		info, err := buildinfo.ReadFile(local)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range info.Settings {
			if s.Key == "CGO_ENABLED" && s.Value != "0" {
				t.Errorf("%s built with CGO_ENABLED=%s", image, s.Value)
			}
		}
		for _, m := range info.Deps {
			if strings.HasPrefix(m.Path, "k8s.io/") || strings.HasPrefix(m.Path, "sigs.k8s.io/") {
				t.Errorf("%s links %s %s: the Kubernetes modules are for the tests only", image, m.Path, m.Version)
			}
		}
	}
}

// TestImageMatchesDeployment checks the image against the Deployment:
// relay is the ENTRYPOINT, in exec form, the server the Deployment runs is
// in the image, EXPOSE names the container's ports, the user is the pod's,
// and the image's default CMD uses the same ports.
func TestImageMatchesDeployment(t *testing.T) {
	final, copied := finalStage(t)
	m := loadManifests(t)
	d := m.deployments[0]
	c, r := relayContainer(t, d)

	ep := final.all("ENTRYPOINT")
	if len(ep) != 1 {
		t.Fatalf("the final stage has %d ENTRYPOINTs, want 1", len(ep))
	}
	entry := execForm(t, "ENTRYPOINT", ep[0])
	if len(entry) != 1 || path.Base(entry[0]) != "relay" || copied[entry[0]] == "" {
		t.Errorf("ENTRYPOINT %q: want relay alone, as copied from the build stage (copied: %v)", entry, copied)
	}
	if copied[r.command[0]] == "" {
		t.Errorf("the Deployment runs %s, which the image does not have (copied: %v)", r.command[0], copied)
	}

	exposed := map[int32]bool{}
	for _, e := range final.all("EXPOSE") {
		for _, p := range strings.Fields(e) {
			n, err := strconv.ParseInt(strings.TrimSuffix(p, "/tcp"), 10, 32)
			if err != nil {
				t.Fatalf("EXPOSE %s: %v", e, err)
			}
			exposed[int32(n)] = true
		}
	}
	for _, p := range c.Ports {
		if !exposed[p.ContainerPort] {
			t.Errorf("container port %d (%s) is not EXPOSEd by the image (%v)", p.ContainerPort, p.Name, exposed)
		}
	}
	if len(exposed) != len(c.Ports) {
		t.Errorf("the image EXPOSEs %v, the container declares %v", exposed, c.Ports)
	}

	users := final.all("USER")
	if len(users) == 0 {
		t.Fatal("the final stage sets no USER")
	}
	uid, _, _ := strings.Cut(users[len(users)-1], ":")
	if sc := d.Spec.Template.Spec.SecurityContext; sc == nil || sc.RunAsUser == nil || strconv.FormatInt(*sc.RunAsUser, 10) != uid {
		t.Errorf("USER %s: the pod's runAsUser must be the same uid (kubectl exec runs relay restart as it, to find the control socket)", uid)
	}

	cmds := final.all("CMD")
	if len(cmds) != 1 {
		t.Fatalf("the final stage has %d CMDs, want 1", len(cmds))
	}
	def, err := parseRelayRun(execForm(t, "CMD", cmds[0]))
	if err != nil {
		t.Fatalf("CMD: %v", err)
	}
	for _, f := range []string{"listen", "metrics"} {
		if got, want := def.port(t, f), r.port(t, f); got != want {
			t.Errorf("CMD's --%s port %d, the Deployment's %d", f, got, want)
		}
	}
	if copied[def.command[0]] == "" {
		t.Errorf("CMD runs %s, which the image does not have", def.command[0])
	}
}

// checkFlags checks every flag of the Deployment's command line against
// the help of the binaries built as the image builds them: a misspelt
// flag, or one this relay lacks, fails here, not in a crash-looping pod.
func checkFlags(t *testing.T, b builtImage) {
	_, copied := finalStage(t)
	m := loadManifests(t)
	_, r := relayContainer(t, m.deployments[0])
	local := func(image string) string {
		l := b.out[copied[image]]
		if l == "" {
			t.Fatalf("%s is not built by the image's build stage", image)
		}
		return l
	}
	help, err := exec.Command(local("/usr/local/bin/relay"), "run", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("relay run --help: %v\n%s", err, help)
	}
	for f := range r.flags {
		if !strings.Contains(string(help), "--"+f+" ") {
			t.Errorf("relay run has no flag --%s (relay run --help)", f)
		}
	}
	// Go's flag package prints every flag as "  -NAME" in -h.
	server := exec.Command(local(r.command[0]), "-h")
	out, _ := server.CombinedOutput() // -h exits 2
	for _, a := range r.command[1:] {
		if name, ok := strings.CutPrefix(a, "-"); ok && !strings.Contains(string(out), "  -"+name) {
			t.Errorf("%s has no flag %s (-h)", r.command[0], a)
		}
	}
}
