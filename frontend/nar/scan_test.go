package nar

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/storepath/references"

	"tvixfarm/cas/digest"
)

// storePath returns a store path with a hash part made from seed.
func storePath(seed uint64, name string) string {
	return "/nix/store/" + nixbase32.EncodeToString(randomData(seed+1000, 20)) + "-" + name
}

// naiveRefs is Nix's search written plainly: every window of 32 nix32
// characters is looked up.
func naiveRefs(data []byte, candidates []string) []string {
	byHash := map[string]string{}
	for _, c := range candidates {
		byHash[filepath.Base(c)[:hashLen]] = c
	}
	found := map[string]bool{}
	for i := 0; i+hashLen <= len(data); i++ {
		w := data[i : i+hashLen]
		ok := true
		for _, c := range w {
			ok = ok && isNix32[c]
		}
		if p, hit := byHash[string(w)]; ok && hit {
			found[p] = true
		}
	}
	var refs []string
	for p := range found {
		refs = append(refs, p)
	}
	slices.Sort(refs)
	return refs
}

// scanChunks scans data written in chunks of the sizes r draws (up to
// max bytes).
func scanChunks(t *testing.T, data []byte, candidates []string, r *rand.Rand, max int) []string {
	t.Helper()
	s, err := NewScanner(candidates)
	if err != nil {
		t.Fatal(err)
	}
	for len(data) > 0 {
		n := min(len(data), 1+r.IntN(max))
		s.Write(data[:n])
		data = data[n:]
	}
	return s.References()
}

// TestScannerMatchesNaive plants hashes in data that is mostly nix32
// characters (long runs, the hard case) and checks that the Scanner finds
// what Nix's algorithm finds, however the data is split into writes.
func TestScannerMatchesNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var candidates []string
	for i := range 200 {
		candidates = append(candidates, storePath(uint64(i), "c"))
	}
	const alphabet = nixbase32.Alphabet + nixbase32.Alphabet + nixbase32.Alphabet + "-/e\x00"
	for iter := range 300 {
		data := make([]byte, 1+r.IntN(3000))
		for i := range data {
			data[i] = alphabet[r.IntN(len(alphabet))]
		}
		for range r.IntN(6) {
			h := filepath.Base(candidates[r.IntN(len(candidates))])[:hashLen]
			if len(data) >= hashLen {
				copy(data[r.IntN(len(data)-hashLen+1):], h)
			}
		}
		want := naiveRefs(data, candidates)
		for _, max := range []int{1, 7, 31, 32, 33, 100, 5000} {
			if got := scanChunks(t, data, candidates, r, max); !slices.Equal(got, want) {
				t.Fatalf("iteration %d, writes of up to %d bytes: found %v, want %v in %q", iter, max, got, want, data)
			}
		}
	}
}

// TestScannerSplits checks every split of a hash across two and three
// writes, with nix32 characters around it.
func TestScannerSplits(t *testing.T) {
	c := storePath(1, "dep")
	h := filepath.Base(c)[:hashLen]
	for _, ctx := range []struct{ before, after string }{
		{"", ""}, {"/nix/store/", "-dep"}, {"ab", "cd"}, {strings.Repeat("0", 40), strings.Repeat("z", 40)}, {"e", "e"},
	} {
		data := []byte(ctx.before + h + ctx.after)
		for i := 0; i <= len(data); i++ {
			for j := i; j <= len(data); j++ {
				s, _ := NewScanner([]string{c})
				s.Write(data[:i])
				s.Write(data[i:j])
				s.Write(data[j:])
				if got := s.References(); len(got) != 1 {
					t.Fatalf("%q split at %d and %d: found %v", data, i, j, got)
				}
			}
		}
	}
	// A hash with one character changed, or cut short, is no reference.
	for _, data := range []string{h[:hashLen-1], h[:hashLen-1] + "e", "x" + h[1:], h[:10] + "\n" + h[10:]} {
		s, _ := NewScanner([]string{c})
		s.Write([]byte(data))
		if got := s.References(); got != nil {
			t.Errorf("%q: found %v", data, got)
		}
	}
}

// TestGoNixScannerMisses documents why the package has its own scanner:
// go-nix's misses a hash that follows other nix32 characters, which Nix
// (TestReferencesMatchNix) finds.
func TestGoNixScannerMisses(t *testing.T) {
	c := storePath(2, "dep")
	data := []byte("ab" + filepath.Base(c)[:hashLen])
	ours, _ := NewScanner([]string{c})
	ours.Write(data)
	theirs, err := references.NewReferenceScanner([]string{c})
	if err != nil {
		t.Fatal(err)
	}
	theirs.Write(data)
	if got := ours.References(); !slices.Equal(got, []string{c}) {
		t.Errorf("Scanner found %v in %q", got, data)
	}
	t.Logf("go-nix ReferenceScanner finds %v in %q; Nix and Scanner find [%s]", theirs.References(), data, c)
}

func TestNewScannerErrors(t *testing.T) {
	for _, c := range []string{"", "/nix/store/short-x", "nix/store/" + filepath.Base(storePath(1, "x")),
		"/nix/store/" + strings.Repeat("e", hashLen) + "-x", "/nix/store/" + strings.Repeat("0", hashLen) + "x"} {
		if _, err := NewScanner([]string{c}); err == nil {
			t.Errorf("NewScanner accepted %q", c)
		}
	}
	s, err := NewScanner([]string{storePath(1, "a"), storePath(1, "a"), "/other/store/" + filepath.Base(storePath(2, "b"))})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.paths) != 2 {
		t.Errorf("%d candidates, want 2", len(s.paths))
	}
}

// TestReferencesMatchNix builds a derivation with real Nix in a chroot
// store whose output refers to its inputs in every way Nix looks for
// (file contents, unaligned after other nix32 characters, file names,
// symlink targets, a bare hash across 1 MiB and 128 KiB boundaries, its
// own path), and checks that Info, reading the output back from the CAS,
// finds the references Nix registered, with Nix's NAR hash and size.
func TestReferencesMatchNix(t *testing.T) {
	s := newNixStore(t)
	expr := `
let
  dep = n: builtins.toFile "dep${toString n}" "dependency ${toString n}";
  h = p: builtins.substring 11 32 p;
  d = builtins.genList (n: dep n) 12;
  at = builtins.elemAt d;
in derivation {
  name = "refs";
  PATH = "/usr/bin:/bin";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-e" "-c" ''
    mkdir -p $out/sub
    echo "full path: ${at 0}" > $out/plain
    printf 'ab%s' ${h (at 1)} > $out/unaligned
    printf '%s' ${h (at 2)} > $out/bare
    touch $out/sub/${h (at 3)}-in-a-name
    ln -s /somewhere/${h (at 4)}zzz $out/link
    { head -c 1048560 /dev/zero; printf '%s' ${h (at 5)}; head -c 131050 /dev/zero; printf 'x%sx' ${h (at 6)}; head -c 3000000 /dev/zero; } > $out/big
    echo $out > $out/self
    printf 'e%se' ${builtins.substring 1 31 (h (at 7))} > $out/cut
    echo ${builtins.unsafeDiscardStringContext (h (at 8))} > $out/no-context
    ln -s ${at 9} $out/abs-link
  '' ];
  unused = [ (at 10) (at 11) ];
}`
	out, stderr, err := s.build(expr)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, stderr)
	}
	nixRefs := s.query(t, "--references", out)
	slices.Sort(nixRefs) // Nix lists the output's own path last.
	drv := s.query(t, "--deriver", out)[0]
	// The candidates, as Nix has them: the closure of the inputs (the
	// deps with string context: all but dep 8) and the output itself.
	candidates := append(s.query(t, "--references", drv), out)
	t.Logf("Nix: %d references of %d candidates", len(nixRefs), len(candidates))

	real := s.real(out)
	want := nixStoreDump(t, real)
	for _, fn := range digest.Functions {
		cas := newCAS()
		ing := ingestInto(t, cas, real, fn)
		info, err := Info(context.Background(), cas, fn, ing.Node, candidates)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(info.References, nixRefs) {
			t.Errorf("%s: references\n got  %v\n want %v (Nix)", fn, info.References, nixRefs)
		}
		narHash := s.query(t, "--hash", out)[0]
		if info.NarHashString() != narHash || info.NarSize != uint64(len(want)) {
			t.Errorf("%s: NAR %s/%d, Nix %s/%d", fn, info.NarHashString(), info.NarSize, narHash, len(want))
		}
	}
	// Scanning the NAR through Hasher in odd write sizes finds the same.
	h, err := NewHasher(candidates)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 4))
	for data := want; len(data) > 0; {
		n := min(len(data), 1+r.IntN(200))
		h.Write(data[:n])
		data = data[n:]
	}
	if _, _, refs := h.Sum(); !slices.Equal(refs, nixRefs) {
		t.Errorf("Hasher in small writes: %v, want %v", refs, nixRefs)
	}
	// And Nix found what the test meant it to find: deps 0-6 and 9, and
	// itself; not 7 (cut), 10 and 11 (unused).
	if len(nixRefs) != 9 {
		t.Errorf("Nix found %d references, the test expects 9: %v", len(nixRefs), nixRefs)
	}
}

// TestHasherWrites checks that Hasher gives the same result for any
// split of its input.
func TestHasherWrites(t *testing.T) {
	c := storePath(5, "x")
	data := append(randomData(4, 100000), filepath.Base(c)[:hashLen]...)
	data = append(data, randomData(5, 1000)...)
	one, _ := NewHasher([]string{c})
	one.Write(data)
	h1, n1, r1 := one.Sum()
	for _, step := range []int{1, 3, 64, 4096} {
		h, _ := NewHasher([]string{c})
		for i := 0; i < len(data); i += step {
			h.Write(data[i:min(len(data), i+step)])
		}
		h2, n2, r2 := h.Sum()
		if h1 != h2 || n1 != n2 || !slices.Equal(r1, r2) || len(r2) != 1 {
			t.Errorf("writes of %d: %x/%d %v, want %x/%d %v", step, h2, n2, r2, h1, n1, r1)
		}
	}
	if _, err := NewHasher([]string{"bad"}); err == nil {
		t.Error("NewHasher accepted a bad candidate")
	}
}

// TestInfoReferencesInNamesAndTargets checks references in names and
// symlink targets without Nix.
func TestInfoReferencesInNamesAndTargets(t *testing.T) {
	a, b, c := storePath(10, "a"), storePath(11, "b"), storePath(12, "c")
	root := filepath.Join(t.TempDir(), "p")
	writeFile(t, root+"/"+filepath.Base(a), "", 0o444)
	symlink(t, b+"/bin/x", root+"/link")
	writeFile(t, root+"/other", "nothing", 0o444)
	cas := newCAS()
	ing := ingestInto(t, cas, root, digest.SHA256)
	info, err := Info(context.Background(), cas, digest.SHA256, ing.Node, []string{c, b, a})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{a, b}
	slices.Sort(want)
	if !slices.Equal(info.References, want) {
		t.Errorf("references %v, want %v", info.References, want)
	}
	var nar bytes.Buffer
	if err := Dump(root, &nar); err != nil {
		t.Fatal(err)
	}
	if got := naiveRefs(nar.Bytes(), []string{a, b, c}); !slices.Equal(got, want) {
		t.Errorf("naive: %v", got)
	}
}
