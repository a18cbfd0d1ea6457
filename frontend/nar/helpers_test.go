package nar

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Real Nix is the oracle of these tests. They skip when it is missing,
// unless TVIXFARM_REQUIRE_NIX=1.

func nixTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("TVIXFARM_REQUIRE_NIX") == "1" {
			t.Fatalf("%s is required (TVIXFARM_REQUIRE_NIX=1): %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

// nixStoreDump returns `nix-store --dump path`.
func nixStoreDump(t testing.TB, path string) []byte {
	t.Helper()
	var out, stderr bytes.Buffer
	cmd := exec.Command(nixTool(t, "nix-store"), "--dump", path)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("nix-store --dump %q: %v: %s", path, err, stderr.String())
	}
	return out.Bytes()
}

// nixHash returns the output of nix-hash with args.
func nixHash(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(nixTool(t, "nix-hash"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("nix-hash %q: %v: %s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// nixStore is a chroot Nix store in a temporary directory, in which real
// Nix builds derivations in its sandbox with the host's /bin and /usr
// (there is no nixpkgs here). It leaves the machine's /nix alone.
type nixStore struct {
	dir string
}

var (
	probeOnce sync.Once
	probeErr  error
	probeOut  string
)

// newNixStore returns a chroot store, or skips the test when Nix cannot
// build in one on this machine.
func newNixStore(t *testing.T) *nixStore {
	t.Helper()
	nixTool(t, "nix-build")
	s := &nixStore{dir: t.TempDir()}
	probeOnce.Do(func() {
		p := &nixStore{dir: filepath.Join(os.TempDir(), "tvixfarm-nar-probe-"+time.Now().Format("150405.000000"))}
		defer os.RemoveAll(p.dir)
		_, probeOut, probeErr = p.build(`derivation { name = "probe"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }`)
	})
	if probeErr != nil {
		if os.Getenv("TVIXFARM_REQUIRE_NIX") == "1" {
			t.Fatalf("nix-build in a chroot store fails: %v\n%s", probeErr, probeOut)
		}
		t.Skipf("nix-build in a chroot store fails here: %v\n%s", probeErr, probeOut)
	}
	return s
}

// args are the options of every Nix command on the store.
func (s *nixStore) args() []string {
	var paths []string
	for _, p := range []string{"/bin", "/usr", "/lib", "/lib64", "/lib32"} {
		if _, err := os.Stat(p); err == nil {
			paths = append(paths, p)
		}
	}
	return []string{
		"--store", s.dir,
		"--option", "sandbox", "true",
		"--option", "sandbox-fallback", "false",
		"--option", "sandbox-paths", strings.Join(paths, " "),
		"--option", "build-users-group", "",
		"--option", "substituters", "",
	}
}

// build builds expr and returns the output path and stderr.
func (s *nixStore) build(expr string) (string, string, error) {
	args := append([]string{"--no-out-link", "--expr", expr}, s.args()...)
	var out, stderr bytes.Buffer
	cmd := exec.Command("nix-build", args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	return strings.TrimSpace(out.String()), stderr.String(), err
}

// instantiate instantiates expr and returns the .drv path and stderr.
func (s *nixStore) instantiate(expr string) (string, string, error) {
	args := append([]string{"--expr", expr}, s.args()...)
	var out, stderr bytes.Buffer
	cmd := exec.Command("nix-instantiate", args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	return strings.TrimSpace(out.String()), stderr.String(), err
}

// query runs nix-store -q with args.
func (s *nixStore) query(t *testing.T, args ...string) []string {
	t.Helper()
	out, err := exec.Command("nix-store", append(append([]string{"-q"}, args...), "--store", s.dir)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nix-store -q %q: %v: %s", args, err, out)
	}
	return strings.Fields(string(out))
}

// real returns where the store path p is on disk.
func (s *nixStore) real(p string) string { return filepath.Join(s.dir, p) }

// Tree builders. Each builds an object at path, which does not exist yet.

func writeFile(t testing.TB, path, data string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // WriteFile's mode is masked.
		t.Fatal(err)
	}
}

func mkdir(t testing.TB, path string) {
	t.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatal(err)
	}
}

func symlink(t testing.TB, target, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

// randomData returns n deterministic pseudo-random bytes.
func randomData(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	return b
}

// smallTree builds a directory of n small files (of 100 to 4,000 bytes)
// in 10 subdirectories, as a package's share/ or lib/ looks.
func smallTree(t testing.TB, root string, n int) {
	t.Helper()
	data := randomData(7, 4000*n)
	for i := 0; i < n; i++ {
		size := 100 + (i*37)%3900
		name := filepath.Join(root, "d"+string(rune('0'+i%10)), "file-"+strings.Repeat("x", i%7)+itoa(i))
		mode := os.FileMode(0o444)
		if i%5 == 0 {
			mode = 0o555
		}
		writeFile(t, name, string(data[i*4000:i*4000+size]), mode)
	}
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

// ingestInto ingests root and uploads it into cas.
func ingestInto(t testing.TB, cas blobstore.BlobAccess, root string, fn digest.Function) *Ingested {
	t.Helper()
	ing, err := Ingest(context.Background(), root, fn)
	if err != nil {
		t.Fatalf("Ingest(%q): %v", root, err)
	}
	if err := Upload(context.Background(), cas, ing); err != nil {
		t.Fatalf("Upload(%q): %v", root, err)
	}
	return ing
}

func newCAS() blobstore.BlobAccess { return blobstore.NewMemory(blobstore.CAS, 1<<40) }

// countingCAS counts the calls to a BlobAccess and can delay Gets, as a
// remote CAS does.
type countingCAS struct {
	blobstore.BlobAccess
	delay                 time.Duration
	gets, puts, finds     atomic.Int64
	inFlight, maxInFlight atomic.Int64
	fail                  map[digest.Digest]error
}

func (c *countingCAS) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	c.gets.Add(1)
	n := c.inFlight.Add(1)
	defer c.inFlight.Add(-1)
	for {
		m := c.maxInFlight.Load()
		if n <= m || c.maxInFlight.CompareAndSwap(m, n) {
			break
		}
	}
	if c.delay > 0 {
		select {
		case <-time.After(c.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err := c.fail[d]; err != nil {
		return nil, err
	}
	return c.BlobAccess.Get(ctx, d)
}

func (c *countingCAS) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	c.puts.Add(1)
	return c.BlobAccess.Put(ctx, d, r)
}

func (c *countingCAS) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	c.finds.Add(1)
	return c.BlobAccess.FindMissing(ctx, ds)
}
