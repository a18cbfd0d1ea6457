package translate

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/derivation"

	"tvixfarm/cas/digest"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

func TestPlaceholder(t *testing.T) {
	// The value Nix 2.8 prints for builtins.placeholder "out".
	if got, want := Placeholder("out"), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"; got != want {
		t.Errorf("Placeholder(out) = %s, want %s", got, want)
	}
}

const (
	bb  = "/nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox"
	out = "/nix/store/d5w9lzs3xm10036lkyps85s6bpk0xkyl-x"
)

func drv(env map[string]string) *Derivation {
	e := map[string]string{"name": "x", "out": out, "builder": bb + "/bin/sh", "system": "x86_64-linux"}
	for k, v := range env {
		e[k] = v
	}
	return &Derivation{Path: "/nix/store/x72kdl72irdhls3jglkpi80ylayrccvj-x.drv", Derivation: &derivation.Derivation{
		Outputs:      map[string]*derivation.Output{"out": {Path: out}},
		InputSources: []string{bb},
		Platform:     "x86_64-linux",
		Builder:      bb + "/bin/sh",
		Arguments:    []string{"-c", "echo " + Placeholder("out")},
		Env:          e,
	}}
}

func closure() map[string]*storepb.PathInfo {
	d := digest.Compute(digest.BLAKE3, []byte("dir"))
	return map[string]*storepb.PathInfo{bb: {StorePath: bb, Node: &storepb.Node{Kind: storepb.Node_DIRECTORY, DigestFunction: "blake3",
		Digest: &storepb.Digest{Hash: func() []byte { h := d.Hash(); return h[:] }(), Size: d.Size()}}}}
}

func env(a *Action) map[string]string {
	m := map[string]string{}
	for _, v := range a.Command.EnvironmentVariables {
		m[v.Name] = v.Value
	}
	return m
}

func TestTranslate(t *testing.T) {
	cfg := Config{DigestFunction: digest.BLAKE3, Cores: 4}
	d := drv(map[string]string{"passAsFile": "big", "big": "data " + Placeholder("out"), "PATH": bb + "/bin", "TMPDIR": "/nope"})
	a, err := Translate(cfg, d, closure())
	if err != nil {
		t.Fatal(err)
	}
	e := env(a)
	for k, v := range map[string]string{
		"HOME": "/homeless-shelter", "NIX_BUILD_CORES": "4", "NIX_BUILD_TOP": "/build", "NIX_LOG_FD": "2", "NIX_STORE": "/nix/store",
		"PATH": bb + "/bin", "PWD": "/build", "TMPDIR": "/build", "TERM": "xterm-256color", "out": out,
		"bigPath": "/build/.attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a",
	} {
		if e[k] != v {
			t.Errorf("env %s = %q, want %q", k, e[k], v)
		}
	}
	if _, ok := e["big"]; ok {
		t.Error("a passAsFile attribute stayed in the environment")
	}
	for i := 1; i < len(a.Command.EnvironmentVariables); i++ {
		if a.Command.EnvironmentVariables[i-1].Name >= a.Command.EnvironmentVariables[i].Name {
			t.Fatal("environment not sorted")
		}
	}
	if got := a.Command.Arguments; got[0] != bb+"/bin/sh" || got[2] != "echo "+out {
		t.Errorf("arguments = %q (placeholder not replaced?)", got)
	}
	if a.Command.WorkingDirectory != "build" || !slices.Equal(a.Command.OutputPaths, []string{".." + out}) {
		t.Errorf("working directory %q, outputs %q", a.Command.WorkingDirectory, a.Command.OutputPaths)
	}
	var found bool
	for _, data := range a.Blobs {
		if string(data) == "data "+out {
			found = true
		}
	}
	if !found {
		t.Error("the passAsFile file (with its placeholder replaced) is not among the blobs")
	}
	// Deterministic: the same derivation gives the same action.
	b, _ := Translate(cfg, d, closure())
	if a.Digest != b.Digest {
		t.Error("two translations of one derivation differ")
	}
	props := map[string]string{}
	for _, p := range a.Action.Platform.GetProperties() {
		props[p.Name] = p.Value
	}
	if props[PropNixSystem] != "x86_64-linux" || props[PropPTY] != "true" || props[PropNetwork] != "" {
		t.Errorf("platform = %v", props)
	}
}

func TestTranslateFixedOutput(t *testing.T) {
	d := drv(map[string]string{"impureEnvVars": "http_proxy"})
	d.Outputs["out"].HashAlgorithm = "sha256"
	d.Outputs["out"].Hash = strings.Repeat("0", 64)
	a, err := Translate(Config{DigestFunction: digest.BLAKE3, ImpureEnv: func(k string) (string, bool) { return "proxy:1", k == "http_proxy" }}, d, closure())
	if err != nil {
		t.Fatal(err)
	}
	if e := env(a); e["NIX_OUTPUT_CHECKED"] != "1" || e["http_proxy"] != "proxy:1" {
		t.Errorf("env = %v", e)
	}
	if !a.Fixed {
		t.Error("not fixed")
	}
	var network bool
	for _, p := range a.Action.Platform.GetProperties() {
		network = network || (p.Name == PropNetwork && p.Value == "true")
	}
	if !network {
		t.Error("a fixed-output derivation gets no network")
	}
}

func TestUnsupported(t *testing.T) {
	ca := drv(nil)
	ca.Outputs["out"].Path = ""
	builtin := drv(nil)
	builtin.Builder = "builtin:fetchurl"
	for name, d := range map[string]*Derivation{"content-addressed": ca, "builtin": builtin} {
		if _, err := Translate(Config{DigestFunction: digest.BLAKE3}, d, closure()); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), d.Path) {
			t.Errorf("%s: %v, want ErrUnsupported naming the derivation", name, err)
		}
	}
}

func TestSandboxPaths(t *testing.T) {
	f := File{Digest: digest.Compute(digest.BLAKE3, []byte("sh")), Executable: true}
	if _, err := Translate(Config{DigestFunction: digest.BLAKE3, SandboxPaths: map[string]File{"/bin/sh": f}}, drv(nil), closure()); err != nil {
		t.Errorf("/bin/sh: %v", err)
	}
	for _, p := range []string{"/etc/passwd", "/build/x", "/nix/store/x", "/../x"} {
		if _, err := Translate(Config{DigestFunction: digest.BLAKE3, SandboxPaths: map[string]File{p: f}}, drv(nil), closure()); err == nil {
			t.Errorf("sandbox path %s inside the sandbox's own directories was accepted", p)
		}
	}
}

func TestShellAttrs(t *testing.T) {
	m, err := parseJSON(`{"s":"it's","i":3,"f":1.5,"w":2.0,"b":true,"n":null,"l":["a",1],"m":{"k":"v"},"bad-name":"x","nested":[[1]]}`)
	if err != nil {
		t.Fatal(err)
	}
	want := "declare b=1\ndeclare i=3\ndeclare -a l=('a' 1 )\ndeclare -A m=(['k']='v' )\ndeclare n=''\ndeclare s='it'\\''s'\ndeclare w=2\n"
	if got := shellAttrs(m); got != want {
		t.Errorf("shellAttrs =\n%s\nwant\n%s", got, want)
	}
}
