package nixtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"
)

// Expected values for the reference busybox (ReferenceBusybox) and salt "".
const (
	trivialPath    = "/nix/store/agmqg3wkxmijchkywxxsy7asq2m8ys0b-trivial"
	trivialDrv     = "/nix/store/s7bxk6d3jdmh572w06lhm2kgma8pipzc-trivial.drv"
	trivialNarHash = "sha256:0bnjziiy6yiwihpas1773kbz6q9rrj7mmp9l53ifxzm80wh2v6nz"
	trivialNarSize = 144
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestNix32(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		// The busybox NAR hash of the reference, as path-info --json and nix-store -q --hash print it.
		{"sha256-gnrG9qZ4EoLkK7Lw/6/COHG55s9O1M/bMPRnS2iH9jY=", "sha256:0dpnhxl4nrzl63dwzm2frzkbjw9qqapzzw5j5gj844kqlvvccyl2"},
		{"sha256:0dpnhxl4nrzl63dwzm2frzkbjw9qqapzzw5j5gj844kqlvvccyl2", "sha256:0dpnhxl4nrzl63dwzm2frzkbjw9qqapzzw5j5gj844kqlvvccyl2"},
		// sha256 of the empty string, hex and nix32.
		{"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"},
	} {
		got, err := NixNarHash(c.in)
		if err != nil || got != c.want {
			t.Errorf("NixNarHash(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "md5-abc", "sha256-AAAA", "sha256:xyz"} {
		if got, err := NixNarHash(bad); err == nil {
			t.Errorf("NixNarHash(%q) = %q, want an error", bad, got)
		}
	}
	// A 20-byte (sha1) value: 32 characters, as in store path hashes.
	if got := Nix32(make([]byte, 20)); got != strings.Repeat("0", 32) {
		t.Errorf("Nix32(20 zero bytes) = %q", got)
	}
}

func TestCorpusDir(t *testing.T) {
	dir := CorpusDir()
	if !filepath.IsAbs(dir) {
		t.Fatalf("CorpusDir() = %q, not absolute", dir)
	}
	for _, f := range []string{"default.nix", "lib.nix", "README.md"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
	if _, err := os.Stat(setupScript()); err != nil {
		t.Error(err)
	}
}

// uniqueSalt returns a salt no other test run uses, so that tests that
// delete outputs do not pull them from under another package's tests.
func uniqueSalt() string {
	return fmt.Sprintf("nixtest-%d-%d", os.Getpid(), time.Now().UnixNano())
}

// TestRealiseTrivial builds the trivial case (salt "") and checks its
// PathInfo against Nix's own answers and, with the reference busybox, the
// reference values.
func TestRealiseTrivial(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	drvs, err := Instantiate(ctx, CorpusFile(), []string{"trivial"}, map[string]string{"busybox": bb})
	if err != nil {
		t.Fatal(err)
	}
	if len(drvs) != 1 || !strings.HasSuffix(drvs[0], "-trivial.drv") {
		t.Fatalf("Instantiate(trivial) = %v", drvs)
	}
	drv := drvs[0]
	infos, _, err := Realise(ctx, drv)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 {
		t.Fatalf("Realise: %d outputs, want 1: %+v", len(infos), infos)
	}
	got := infos["out"]
	outs, err := Outputs(ctx, drv)
	if err != nil {
		t.Fatal(err)
	}
	hash, _, err := run(ctx, "nix-store", "-q", "--hash", got.Path)
	if err != nil {
		t.Fatal(err)
	}
	want := PathInfo{
		Path:       outs["out"],
		NarHash:    strings.TrimSpace(hash),
		NarSize:    trivialNarSize,
		References: []string{},
		Deriver:    drv,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("PathInfo = %+v\nwant %+v", got, want)
	}
	if got.NarHash != trivialNarHash {
		t.Errorf("NAR hash %s, want %s", got.NarHash, trivialNarHash)
	}
	if bb == ReferenceBusybox && (drv != trivialDrv || got.Path != trivialPath) {
		t.Errorf("with the reference busybox: drv %s, path %s; want %s, %s", drv, got.Path, trivialDrv, trivialPath)
	}
}

// TestDeleteAndRebuild deletes a freshly built output and builds it again.
func TestDeleteAndRebuild(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	drvs, err := Instantiate(ctx, CorpusFile(), []string{"trivial"}, map[string]string{"busybox": bb, "salt": uniqueSalt()})
	if err != nil {
		t.Fatal(err)
	}
	drv := drvs[0]
	first, log, err := Realise(ctx, drv)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log, "building '"+drv+"'") {
		t.Errorf("log does not show a build of %s:\n%s", drv, log)
	}
	out := first["out"].Path
	if err := Delete(ctx, out); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after Delete: %s still there (%v)", out, err)
	}
	if left, err := QueryPathInfo(ctx, out); err != nil || len(left) != 0 {
		t.Fatalf("after Delete: QueryPathInfo = %v, %v", left, err)
	}
	again, log, err := Realise(ctx, drv)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log, "building '"+drv+"'") {
		t.Errorf("second Realise did not build:\n%s", log)
	}
	if !reflect.DeepEqual(first, again) {
		t.Errorf("rebuild: %+v\nfirst build: %+v", again, first)
	}
	if again["out"].NarHash != trivialNarHash {
		t.Errorf("NAR hash %s, want %s (the salt is not in the output)", again["out"].NarHash, trivialNarHash)
	}
	blog, err := BuildLog(ctx, drv)
	if err != nil || blog != "" {
		t.Errorf("BuildLog(trivial) = %q, %v; want an empty log", blog, err)
	}
}

func TestRealiseMultiOutput(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	drvs, err := Instantiate(ctx, CorpusDir(), []string{"multiOutput"}, map[string]string{"busybox": bb})
	if err != nil {
		t.Fatal(err)
	}
	infos, _, err := Realise(ctx, drvs[0])
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range infos {
		names = append(names, n)
	}
	sort.Strings(names)
	if want := []string{"bin", "dev", "doc", "out"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("outputs %v, want %v", names, want)
	}
	refs := map[string][]string{
		"out": {infos["dev"].Path},
		"dev": {infos["doc"].Path},
		"doc": {},
		"bin": {infos["out"].Path, bb},
	}
	for n, want := range refs {
		sort.Strings(want)
		if got := infos[n].References; !reflect.DeepEqual(got, want) {
			t.Errorf("%s references %v, want %v", n, got, want)
		}
	}
}

func TestRealiseFailure(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	drvs, err := Instantiate(ctx, CorpusFile(), []string{"builderFails"}, map[string]string{"busybox": bb})
	if err != nil {
		t.Fatal(err)
	}
	_, log, err := Realise(ctx, drvs[0])
	var rerr *RealiseError
	if !errors.As(err, &rerr) {
		t.Fatalf("Realise(builderFails) error = %v, want a *RealiseError", err)
	}
	if !strings.Contains(err.Error(), "failed with exit code 3") || log != rerr.Stderr {
		t.Errorf("error %q, log %q", err, log)
	}
	blog, err := BuildLog(ctx, drvs[0])
	if err != nil {
		t.Fatal(err)
	}
	want := "building something\na tab:\there, a CR:\r, done\nthis line goes to stderr\nabout to fail with exit code 3\n"
	if blog != want {
		t.Errorf("BuildLog = %q, want %q", blog, want)
	}
}

// TestDeleteAlive checks that Delete skips paths kept alive by a referrer.
func TestDeleteAlive(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	drvs, err := Instantiate(ctx, CorpusFile(), []string{"chain"}, map[string]string{"busybox": bb, "salt": uniqueSalt()})
	if err != nil {
		t.Fatal(err)
	}
	infos, _, err := Realise(ctx, drvs[0])
	if err != nil {
		t.Fatal(err)
	}
	chain := infos["out"]
	var chainA string
	for _, r := range chain.References {
		if strings.HasSuffix(r, "-chain-a") {
			chainA = r
		}
	}
	if chainA == "" {
		t.Fatalf("chain does not refer to chain-a: %v", chain.References)
	}
	// chain-a is kept alive by chain-b; chain and the absent path go.
	absent := "/nix/store/00000000000000000000000000000000-nixtest-absent"
	if err := Delete(ctx, chainA, chain.Path, absent); err != nil {
		t.Fatal(err)
	}
	left, err := QueryPathInfo(ctx, chainA, chain.Path, absent)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := left[chainA]; !ok {
		t.Errorf("%s was deleted", chainA)
	}
	if _, ok := left[chain.Path]; ok || len(left) != 1 {
		t.Errorf("after Delete: %v", left)
	}
}

// TestCorpus checks that Cases lists exactly the corpus' attributes and,
// unless -short, that Nix builds each case or refuses it as Cases says.
func TestCorpus(t *testing.T) {
	bb := Busybox(t)
	ctx := testContext(t)
	out, err := exec.CommandContext(ctx, "nix-instantiate", "--eval", "--json", "--strict", "-E",
		"builtins.attrNames (import "+CorpusFile()+" { busybox = \""+bb+"\"; })").Output()
	if err != nil {
		t.Fatal(err)
	}
	var attrs []string
	if err := json.Unmarshal(out, &attrs); err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, c := range Cases {
		listed = append(listed, c.Attr)
	}
	sort.Strings(listed)
	if !reflect.DeepEqual(attrs, listed) {
		t.Fatalf("corpus attributes %v\nCases %v", attrs, listed)
	}
	if testing.Short() {
		t.Skip("building the corpus: not in -short mode")
	}
	for _, c := range Cases {
		t.Run(c.Attr, func(t *testing.T) {
			drvs, err := Instantiate(ctx, CorpusFile(), []string{c.Attr}, map[string]string{"busybox": bb})
			if err != nil {
				t.Fatal(err)
			}
			var errs []string
			for _, d := range drvs {
				if _, _, err := Realise(ctx, d); err != nil {
					errs = append(errs, err.Error())
				}
			}
			switch {
			case c.WantError == "" && len(errs) > 0:
				t.Errorf("Nix failed: %s", strings.Join(errs, "\n"))
			case c.WantError != "" && len(errs) == 0:
				t.Errorf("Nix built it; want an error with %q", c.WantError)
			case c.WantError != "" && !strings.Contains(strings.Join(errs, "\n"), c.WantError):
				t.Errorf("Nix failed with %s\nwant an error with %q", strings.Join(errs, "\n"), c.WantError)
			}
		})
	}
}
