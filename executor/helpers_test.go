package executor

import (
	"bytes"
	"context"
	"io"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/executor/inputs"
	"tvixfarm/executor/sandbox"
)

// busyboxPath is the store path of Debian's busybox as Nix adds it (see
// nix-sandbox.md); the probes use it as a Nix builder would.
const busyboxPath = "nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox"

type testEnv struct {
	t    testing.TB
	fn   digest.Function
	cas  blobstore.BlobAccess
	sb   sandbox.Sandbox
	exec *Executor
}

// newEnv starts an executor on the runc sandbox with a memory CAS.
func newEnv(t testing.TB, prewarm int) *testEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "the sandbox needs root")
	}
	dir := t.TempDir()
	sb, err := sandbox.NewRunc(sandbox.RuncOptions{Dir: dir + "/sandbox", Prewarm: prewarm, Reuse: testReuse(), Defaults: sandbox.Limits{Pids: 4096}})
	if err != nil {
		skipOrFail(t, err.Error())
	}
	t.Cleanup(func() { sb.Close() })
	return newEnvWith(t, dir, sb)
}

// testReuse is RuncOptions.Reuse for the tests: TVIXFARM_TEST_REUSE, or
// 100 as in the farm (internal/farm.DefaultReuse); 1 tests a container
// per command.
func testReuse() int {
	if n, err := strconv.Atoi(os.Getenv("TVIXFARM_TEST_REUSE")); err == nil {
		return n
	}
	return 100
}

// newEnvWith starts an executor on sb; Nix actions get their store paths
// as an overlay of layers, as in production, unless sb is unsandboxed.
func newEnvWith(t testing.TB, dir string, sb sandbox.Sandbox) *testEnv {
	_, runc := sb.(*sandbox.Runc)
	return newEnvLayers(t, dir, sb, runc)
}

func newEnvLayers(t testing.TB, dir string, sb sandbox.Sandbox, layered bool) *testEnv {
	cas := blobstore.NewMemory(blobstore.CAS, 1<<30)
	cache, err := inputs.NewCache(dir+"/cache", 1<<30, cas)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	mat := inputs.NewMaterializer(cache, 64<<20)
	var layers *inputs.Layers
	if layered {
		if layers, err = inputs.NewLayers(mat, dir+"/layers", 1<<30); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { layers.Close() })
	}
	e := New(Config{Name: "test-worker", Dir: dir + "/executor", Features: []string{"kvm", "big-parallel"}, Slots: 2, DefaultTimeout: time.Minute, Layers: layers},
		cas, mat, sb)
	if err := e.Init(); err != nil {
		t.Fatal(err)
	}
	return &testEnv{t: t, fn: digest.SHA256, cas: cas, sb: sb, exec: e}
}

// skipOrFail skips a test that needs the sandbox, unless the run asks for
// the sandbox to be there (make test sets TVIXFARM_REQUIRE_SANDBOX=1).
func skipOrFail(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("TVIXFARM_REQUIRE_SANDBOX") == "1" {
		t.Fatalf("sandbox required: %s", why)
	}
	t.Skip(why)
}

func (e *testEnv) put(data []byte) digest.Digest {
	d := digest.Compute(e.fn, data)
	if err := e.cas.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		e.t.Fatal(err)
	}
	return d
}

func (e *testEnv) putProto(m proto.Message) digest.Digest {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.put(b)
}

// entry is a file, executable file, symlink or directory of a tree.
type entry struct {
	data    []byte
	exec    bool
	symlink string
	dir     bool
}

func file(s string) entry     { return entry{data: []byte(s)} }
func execFile(b []byte) entry { return entry{data: b, exec: true} }
func symlink(t string) entry  { return entry{symlink: t} }

var dirEntry = entry{dir: true}

// tree uploads a tree given as paths and returns its root digest.
func (e *testEnv) tree(files map[string]entry) digest.Digest {
	type node struct {
		files    map[string]entry
		children map[string]*node
	}
	newNode := func() *node { return &node{files: map[string]entry{}, children: map[string]*node{}} }
	root := newNode()
	for p, en := range files {
		n := root
		parts := strings.Split(p, "/")
		last := len(parts)
		if !en.dir {
			last--
		}
		for _, c := range parts[:last] {
			if n.children[c] == nil {
				n.children[c] = newNode()
			}
			n = n.children[c]
		}
		if !en.dir {
			n.files[parts[len(parts)-1]] = en
		}
	}
	var up func(n *node) digest.Digest
	up = func(n *node) digest.Digest {
		d := &repb.Directory{}
		for _, name := range sortedKeys(n.files) {
			en := n.files[name]
			if en.symlink != "" {
				d.Symlinks = append(d.Symlinks, &repb.SymlinkNode{Name: name, Target: en.symlink})
				continue
			}
			d.Files = append(d.Files, &repb.FileNode{Name: name, Digest: e.put(en.data).Proto(), IsExecutable: en.exec})
		}
		for _, name := range sortedKeys(n.children) {
			d.Directories = append(d.Directories, &repb.DirectoryNode{Name: name, Digest: up(n.children[name]).Proto()})
		}
		return e.putProto(d)
	}
	return up(root)
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

var busyboxBytes []byte

// nixRoot is the input root of a Nix-like action: busybox in the store,
// /bin/sh as Nix's sandbox-paths gives it, a /build working directory.
func (e *testEnv) nixRoot(extra map[string]entry) map[string]entry {
	if busyboxBytes == nil {
		b, err := os.ReadFile("/bin/busybox")
		if err != nil {
			skipOrFail(e.t, "busybox-static is not installed")
		}
		busyboxBytes = b
	}
	m := map[string]entry{
		busyboxPath + "/bin/busybox": execFile(busyboxBytes),
		busyboxPath + "/bin/sh":      symlink("busybox"),
		"bin/sh":                     symlink("/" + busyboxPath + "/bin/busybox"),
		"build":                      dirEntry,
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

// action describes an action for the tests.
type action struct {
	args     []string
	env      map[string]string
	wd       string
	outputs  []string // output_paths
	outFiles []string // legacy
	outDirs  []string // legacy
	platform map[string]string
	timeout  time.Duration
	root     map[string]entry
}

func (e *testEnv) upload(a action) digest.Digest {
	cmd := &repb.Command{Arguments: a.args, WorkingDirectory: a.wd, OutputPaths: a.outputs,
		OutputFiles: a.outFiles, OutputDirectories: a.outDirs}
	for _, k := range sortedKeys(a.env) {
		cmd.EnvironmentVariables = append(cmd.EnvironmentVariables, &repb.Command_EnvironmentVariable{Name: k, Value: a.env[k]})
	}
	platform := &repb.Platform{}
	for _, k := range sortedKeys(a.platform) {
		platform.Properties = append(platform.Properties, &repb.Platform_Property{Name: k, Value: a.platform[k]})
	}
	act := &repb.Action{CommandDigest: e.putProto(cmd).Proto(), InputRootDigest: e.tree(a.root).Proto(), Platform: platform}
	if a.timeout > 0 {
		act.Timeout = durationpb.New(a.timeout)
	}
	return e.putProto(act)
}

// nixAction is a Nix-like action running a busybox shell script in /build.
func (e *testEnv) nixAction(script string, mod func(*action)) action {
	a := action{
		args:     []string{"/" + busyboxPath + "/bin/sh", "-c", script},
		env:      map[string]string{"PATH": "/path-not-set", "HOME": "/homeless-shelter", "NIX_BUILD_TOP": "/build", "TMPDIR": "/build"},
		wd:       "build",
		platform: map[string]string{PropNixSystem: "x86_64-linux"},
		root:     e.nixRoot(nil),
	}
	if mod != nil {
		mod(&a)
	}
	return a
}

// run executes an action and returns the response; it fails the test on
// an execution error.
func (e *testEnv) run(a action) *repb.ExecuteResponse {
	e.t.Helper()
	resp, err := e.exec.Execute(context.Background(), &Request{Action: e.upload(a)})
	if err != nil {
		e.t.Fatalf("execute %q: %v", a.args, err)
	}
	return resp
}

func (e *testEnv) blob(pd *repb.Digest) string {
	e.t.Helper()
	if pd == nil || pd.SizeBytes == 0 {
		return ""
	}
	d, err := digest.FromProto(e.fn, pd)
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := e.cas.Get(context.Background(), d)
	if err != nil {
		e.t.Fatal(err)
	}
	defer r.Close()
	b, _ := io.ReadAll(r)
	return string(b)
}

// sh runs a script and returns exit code, stdout and stderr.
func (e *testEnv) sh(a action) (int32, string, string) {
	e.t.Helper()
	resp := e.run(a)
	r := resp.Result
	return r.ExitCode, e.blob(r.StdoutDigest), e.blob(r.StderrDigest)
}

// lines returns the non-empty lines of s.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func hasLine(s, line string) bool { return slices.Contains(lines(s), line) }

func protoUnmarshal(s string, m proto.Message) error { return proto.Unmarshal([]byte(s), m) }
