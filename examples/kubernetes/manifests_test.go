// Package kubernetes_test checks the example manifests of this directory,
// and the image of examples/container they run, as Kubernetes and relay
// read them: every document is decoded strictly into the Kubernetes API
// types (a misspelt or unknown field fails), and relay's flags in the
// container's arguments decide the probes, the ports and the grace period.
package kubernetes_test

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// manifests are the objects of the example's YAML files, by kind.
type manifests struct {
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	configMaps  []*corev1.ConfigMap
}

// docSeparator is a line that starts a new YAML document.
var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decodeManifests decodes every document of data (from the file named
// name) strictly into its Kubernetes type, adding it to m.
func (m *manifests) decode(name string, data []byte) error {
	for i, doc := range docSeparator.Split(string(data), -1) {
		j, err := yaml.YAMLToJSONStrict([]byte(doc))
		if err != nil {
			return fmt.Errorf("%s, document %d: %w", name, i+1, err)
		}
		if t := bytes.TrimSpace(j); bytes.Equal(t, []byte("null")) || len(t) == 0 {
			continue // comments only
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			return fmt.Errorf("%s, document %d: reading apiVersion and kind: %w", name, i+1, err)
		}
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "apps/v1 Deployment":
			d := new(appsv1.Deployment)
			m.deployments, obj = append(m.deployments, d), d
		case "v1 Service":
			s := new(corev1.Service)
			m.services, obj = append(m.services, s), s
		case "v1 ConfigMap":
			c := new(corev1.ConfigMap)
			m.configMaps, obj = append(m.configMaps, c), c
		default:
			return fmt.Errorf("%s, document %d: apiVersion %q kind %q is not one this test knows; add it to decode", name, i+1, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return fmt.Errorf("%s, document %d (%s): %w", name, i+1, tm.Kind, err)
		}
	}
	return nil
}

// loadManifests decodes every .yaml file of this directory.
func loadManifests(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no YAML files here (%v)", err)
	}
	var m manifests
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.decode(f, data); err != nil {
			t.Fatal(err)
		}
	}
	if len(m.deployments) != 1 || len(m.services) != 1 || len(m.configMaps) != 1 {
		t.Fatalf("want one Deployment, one Service and one ConfigMap, have %d, %d and %d",
			len(m.deployments), len(m.services), len(m.configMaps))
	}
	return m
}

// TestManifestsDecodeStrictly shows that the decoding catches what
// Kubernetes would reject or silently ignore: each bad document below
// differs from a good one by one mistake.
func TestManifestsDecodeStrictly(t *testing.T) {
	good := `apiVersion: v1
kind: ConfigMap
metadata:
  name: ok
data:
  k: v
`
	var m manifests
	if err := m.decode("good", []byte("# comment\n---\n"+good)); err != nil || len(m.configMaps) != 1 {
		t.Fatalf("a good ConfigMap: %v (%d decoded)", err, len(m.configMaps))
	}
	probe := `apiVersion: apps/v1
kind: Deployment
metadata:
  name: bad
spec:
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      containers:
        - name: x
          image: x
          readinessProbe:
            httpGet: {path: /readyz, port: 9090}
            %s
`
	for _, c := range []struct{ name, doc, want string }{
		{"misspelt probe field", fmt.Sprintf(probe, "perodSeconds: 2"), `unknown field "perodSeconds"`},
		{"field at the wrong level", fmt.Sprintf(probe, "path: /readyz"), `unknown field "path"`},
		{"wrong type", fmt.Sprintf(probe, "periodSeconds: two"), `cannot unmarshal`},
		{"duplicate key", good + "data:\n  k: w\n", `already set`},
		{"misspelt kind", strings.Replace(good, "ConfigMap", "Configmap", 1), `is not one this test knows`},
		{"misspelt top-level field", strings.Replace(good, "\ndata:", "\ndat:", 1), `unknown field "dat"`},
	} {
		var m manifests
		err := m.decode(c.name, []byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one with %q", c.name, err, c.want)
		}
	}
}

// relayArgs are the flags of a relay run command line, by name, and the
// server's command after "--".
type relayArgs struct {
	flags   map[string]string
	command []string
}

// parseRelayRun reads relay's arguments: "run", flags, "--", the command.
// relay's own flag definitions are in package main, which a test cannot
// import; every flag this example uses takes a value, and
// TestImageBuild checks their names against the built
// relay's help.
func parseRelayRun(args []string) (relayArgs, error) {
	r := relayArgs{flags: map[string]string{}}
	if len(args) == 0 || args[0] != "run" {
		return r, fmt.Errorf("arguments %q: want relay run first", args)
	}
	for i := 1; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			r.command = args[i+1:]
			break
		}
		name, ok := strings.CutPrefix(a, "--")
		if !ok {
			return r, fmt.Errorf("argument %q: want --FLAG VALUE, or -- before the command", a)
		}
		if n, v, ok := strings.Cut(name, "="); ok {
			r.flags[n] = v
			continue
		}
		if i+1 == len(args) {
			return r, fmt.Errorf("--%s has no value", name)
		}
		r.flags[name] = args[i+1]
		i++
	}
	if len(r.command) == 0 {
		return r, fmt.Errorf("arguments %q: no command after --", args)
	}
	return r, nil
}

// port returns the port of a relay address flag such as --listen :8080.
func (r relayArgs) port(t *testing.T, flag string) int32 {
	t.Helper()
	v, ok := r.flags[flag]
	if !ok {
		t.Fatalf("relay's arguments have no --%s", flag)
	}
	_, p, err := net.SplitHostPort(v)
	if err != nil {
		t.Fatalf("--%s %q: %v", flag, v, err)
	}
	n, err := strconv.ParseInt(p, 10, 32)
	if err != nil {
		t.Fatalf("--%s %q: %v", flag, v, err)
	}
	return int32(n)
}

func (r relayArgs) duration(t *testing.T, flag string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(r.flags[flag])
	if err != nil {
		t.Fatalf("--%s: %v", flag, err)
	}
	return d
}

// relayContainer returns the container that runs relay (the image's
// ENTRYPOINT: no command of its own) and relay's arguments.
func relayContainer(t *testing.T, d *appsv1.Deployment) (*corev1.Container, relayArgs) {
	t.Helper()
	cs := d.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("deployment %s has %d containers, want 1", d.Name, len(cs))
	}
	c := &cs[0]
	if len(c.Command) != 0 {
		t.Fatalf("container %s sets command %q: relay is the image's ENTRYPOINT", c.Name, c.Command)
	}
	r, err := parseRelayRun(c.Args)
	if err != nil {
		t.Fatalf("container %s: %v", c.Name, err)
	}
	return c, r
}

// containerPort resolves a probe's or a Service's port (a number or a
// port name) to the container's port number.
func containerPort(t *testing.T, c *corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, p.StrVal)
	return 0
}

func TestDeploymentMatchesRelayFlags(t *testing.T) {
	m := loadManifests(t)
	d := m.deployments[0]
	c, r := relayContainer(t, d)
	app, admin := r.port(t, "listen"), r.port(t, "metrics")

	declared := map[int32]bool{}
	for _, p := range c.Ports {
		declared[p.ContainerPort] = true
	}
	if !declared[app] || !declared[admin] || len(c.Ports) != 2 {
		t.Errorf("container ports %v: want exactly --listen's %d and --metrics' %d", c.Ports, app, admin)
	}

	for _, p := range []struct {
		what  string
		probe *corev1.Probe
		path  string
	}{{"readinessProbe", c.ReadinessProbe, "/readyz"}, {"livenessProbe", c.LivenessProbe, "/healthz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: want an httpGet probe of %s on relay's --metrics port", p.what, p.path)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s path %q, want %q", p.what, p.probe.HTTPGet.Path, p.path)
		}
		if got := containerPort(t, c, p.probe.HTTPGet.Port); got != admin {
			t.Errorf("%s port %d, want --metrics' %d", p.what, got, admin)
		}
	}

	// The shutdown delay only helps if the kubelet sees /readyz fail
	// before it ends.
	delay, stop := r.duration(t, "shutdown-delay"), r.duration(t, "stop-timeout")
	if rp := c.ReadinessProbe; rp != nil {
		if seen := time.Duration(rp.PeriodSeconds*max(rp.FailureThreshold, 1)) * time.Second; seen >= delay {
			t.Errorf("readiness probe notices a failure after up to %s, not within --shutdown-delay %s", seen, delay)
		}
	}

	// The grace period counts the delay, the stop timeout and relay's own
	// kill and exit (the margin docs/containers.md explains).
	const margin = 5 * time.Second
	gp := d.Spec.Template.Spec.TerminationGracePeriodSeconds
	if gp == nil {
		t.Fatalf("no terminationGracePeriodSeconds: set it from --shutdown-delay %s + --stop-timeout %s + %s", delay, stop, margin)
	}
	if grace := time.Duration(*gp) * time.Second; grace < delay+stop+margin {
		t.Errorf("terminationGracePeriodSeconds %d: want at least --shutdown-delay %s + --stop-timeout %s + %s", *gp, delay, stop, margin)
	}

	if v := d.Spec.Template.Annotations["prometheus.io/port"]; v != strconv.Itoa(int(admin)) {
		t.Errorf("annotation prometheus.io/port %q, want --metrics' %d", v, admin)
	}
}

func TestServiceTargetsTheServer(t *testing.T) {
	m := loadManifests(t)
	d, s := m.deployments[0], m.services[0]
	c, r := relayContainer(t, d)
	if len(s.Spec.Selector) == 0 {
		t.Fatalf("service %s selects nothing", s.Name)
	}
	for k, v := range s.Spec.Selector {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("service selector %s=%s does not match the pod template's labels %v", k, v, d.Spec.Template.Labels)
		}
	}
	if len(s.Spec.Ports) == 0 {
		t.Fatalf("service %s has no ports", s.Name)
	}
	for _, p := range s.Spec.Ports {
		if got, want := containerPort(t, c, p.TargetPort), r.port(t, "listen"); got != want {
			t.Errorf("service port %d targets %d, want --listen's %d", p.Port, got, want)
		}
	}
}

// TestConfigReachesTheServer checks the path from the ConfigMap to the
// server's -greeting-file, and that the volume is one the kubelet updates
// in place (no subPath), so that relay restart in the pod sees a change.
func TestConfigReachesTheServer(t *testing.T) {
	m := loadManifests(t)
	d, cm := m.deployments[0], m.configMaps[0]
	c, r := relayContainer(t, d)
	file := ""
	for i, a := range r.command {
		if a == "-greeting-file" && i+1 < len(r.command) {
			file = r.command[i+1]
		}
	}
	if file == "" {
		t.Fatalf("the server's command %q has no -greeting-file", r.command)
	}
	var vol *corev1.Volume
	for i, v := range d.Spec.Template.Spec.Volumes {
		if v.ConfigMap != nil && v.ConfigMap.Name == cm.Name {
			vol = &d.Spec.Template.Spec.Volumes[i]
		}
	}
	if vol == nil {
		t.Fatalf("no volume of ConfigMap %s", cm.Name)
	}
	found := false
	for _, vm := range c.VolumeMounts {
		if vm.Name != vol.Name {
			continue
		}
		if vm.SubPath != "" || vm.SubPathExpr != "" {
			t.Errorf("volume mount %s uses subPath: the kubelet never updates it", vm.Name)
		}
		key, err := filepath.Rel(vm.MountPath, file)
		if err != nil || strings.HasPrefix(key, "..") {
			continue
		}
		found = true
		if line, _, _ := strings.Cut(cm.Data[key], "\n"); strings.TrimSpace(line) == "" {
			t.Errorf("ConfigMap %s key %q (the server's %s): missing, or its first line is empty", cm.Name, key, file)
		}
	}
	if !found {
		t.Errorf("-greeting-file %s is not in a mount of volume %s", file, vol.Name)
	}

	// relay needs a writable /tmp (its control socket, the children's
	// notify sockets) when the root file system is read-only.
	if sc := c.SecurityContext; sc != nil && sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		tmp := false
		for _, vm := range c.VolumeMounts {
			tmp = tmp || (vm.MountPath == "/tmp" && !vm.ReadOnly)
		}
		if !tmp {
			t.Errorf("readOnlyRootFilesystem without a writable volume at /tmp: relay cannot make its control socket")
		}
	}
}
