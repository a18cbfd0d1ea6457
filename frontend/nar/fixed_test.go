package nar

import (
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"

	"tvixfarm/cas/digest"
)

// outputHashCases lists (outputHash, outputHashAlgo) pairs: every
// encoding of every algorithm, with and without prefixes, and malformed
// ones.
func outputHashCases() [][2]string {
	data := []byte("fixed output")
	sums := map[string][]byte{}
	m, s1, s256, s512 := md5.Sum(data), sha1.Sum(data), sha256.Sum256(data), sha512.Sum512(data)
	sums["md5"], sums["sha1"], sums["sha256"], sums["sha512"] = m[:], s1[:], s256[:], s512[:]
	var cases [][2]string
	for _, algo := range []string{"md5", "sha1", "sha256", "sha512"} {
		sum := sums[algo]
		b64 := base64.StdEncoding.EncodeToString(sum)
		for _, enc := range []string{nixbase32.EncodeToString(sum), hex.EncodeToString(sum), strings.ToUpper(hex.EncodeToString(sum)), b64} {
			cases = append(cases,
				[2]string{enc, algo},
				[2]string{enc, ""},
				[2]string{algo + ":" + enc, algo},
				[2]string{algo + ":" + enc, ""},
				[2]string{algo + ":" + enc, "foo"})
		}
		cases = append(cases,
			[2]string{algo + "-" + b64, ""},
			[2]string{algo + "-" + b64, algo},
			[2]string{algo + "-" + strings.TrimRight(b64, "="), ""},
			[2]string{algo + "-" + hex.EncodeToString(sum), ""},
			[2]string{algo + "-" + nixbase32.EncodeToString(sum), ""},
			[2]string{"", algo},
			[2]string{nixbase32.EncodeToString(sum)[1:], algo},
			[2]string{hex.EncodeToString(sum) + "0", algo},
		)
	}
	n32 := nixbase32.EncodeToString(s256[:])
	cases = append(cases,
		[2]string{"sha256:" + n32, "sha1"},
		[2]string{"sha1:" + n32, ""},
		[2]string{"", ""},
		[2]string{":" + n32, "sha256"},
		[2]string{"SHA256:" + n32, ""},
		[2]string{"z" + n32[1:], "sha256"},   // Bits beyond 256.
		[2]string{"e" + n32[1:], "sha256"},   // Not nix32.
		[2]string{"sha256-" + n32 + "x", ""}, // SRI of the wrong size.
		[2]string{"sha256-!!!!", ""},         // Not base64.
		[2]string{"g" + hex.EncodeToString(s256[:])[1:], "sha256"},
		[2]string{base64.StdEncoding.EncodeToString(s256[:])[:43] + "A", "sha256"}, // No padding, 44 chars.
	)
	return cases
}

var drvOutput = regexp.MustCompile(`^Derive\(\[\("out","[^"]*","([^"]*)","([^"]*)"\)\]`)

// TestParseOutputHashMatchesNix instantiates a fixed-output derivation
// for every case with real Nix and checks that ParseOutputHash accepts
// what Nix accepts, with the hash Nix writes into the .drv.
func TestParseOutputHashMatchesNix(t *testing.T) {
	s := newNixStore(t)
	for i, c := range outputHashCases() {
		t.Run(fmt.Sprintf("%d", i), func(t *testing.T) {
			t.Parallel()
			expr := fmt.Sprintf(`derivation { name = "fod"; system = "x86_64-linux"; builder = "/bin/sh"; outputHash = %q; outputHashAlgo = %q; }`, c[0], c[1])
			drv, stderr, err := s.instantiate(expr)
			got, gotErr := ParseOutputHash(c[0], c[1])
			if err != nil {
				if gotErr == nil {
					t.Errorf("ParseOutputHash(%q, %q) = %v, Nix fails: %s", c[0], c[1], got, lastLine(stderr))
				} else {
					t.Logf("%q %q: Nix: %s; ParseOutputHash: %v", c[0], c[1], lastLine(stderr), gotErr)
				}
				return
			}
			if gotErr != nil {
				t.Fatalf("ParseOutputHash(%q, %q): %v; Nix accepts it", c[0], c[1], gotErr)
			}
			data, err := os.ReadFile(s.real(drv))
			if err != nil {
				t.Fatal(err)
			}
			m := drvOutput.FindSubmatch(data)
			if m == nil {
				t.Fatalf("no output in %s", data)
			}
			if got.Algo().String() != string(m[1]) || hex.EncodeToString(got.Digest()) != string(m[2]) {
				t.Errorf("ParseOutputHash(%q, %q) = %s:%x, Nix: %s:%s", c[0], c[1], got.Algo(), got.Digest(), m[1], m[2])
			}
		})
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestParseOutputHashDrv covers the .drv form, which Nix does not
// evaluate: "r:" before the algorithm and a bare base-16 hash.
func TestParseOutputHashDrv(t *testing.T) {
	sum := sha256.Sum256([]byte("x"))
	h, err := ParseOutputHash(hex.EncodeToString(sum[:]), "r:sha256")
	if err != nil || h.Algo() != nixhash.SHA256 || string(h.Digest()) != string(sum[:]) {
		t.Errorf("ParseOutputHash of a .drv output: %v, %v", h, err)
	}
	if h.String() != hex.EncodeToString(sum[:]) {
		t.Errorf("String() = %s, want the original encoding", h)
	}
	for in, want := range map[string][2]string{"r:sha256": {ModeRecursive, "sha256"}, "sha1": {ModeFlat, "sha1"}, "": {ModeFlat, ""}} {
		if m, a := SplitHashAlgo(in); m != want[0] || a != want[1] {
			t.Errorf("SplitHashAlgo(%q) = %q, %q", in, m, a)
		}
	}
	z, err := ParseOutputHash("", "sha256")
	if err != nil || z.String() != "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" {
		t.Errorf("empty hash: %v, %v", z, err)
	}
}

// TestCheckFixedMatchesNix checks flat and recursive hashes of every
// algorithm against nix-hash, and the refusal of flat hashes of anything
// but a non-executable regular file.
func TestCheckFixedMatchesNix(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	writeFile(t, dir+"/file", "contents\n", 0o444)
	writeFile(t, dir+"/exec", "#!/bin/sh\n", 0o555)
	writeFile(t, dir+"/empty", "", 0o444)
	writeFile(t, dir+"/tree/a", "a", 0o444)
	symlink(t, "a", dir+"/tree/b")
	symlink(t, "file", dir+"/link")
	cas := newCAS()
	nodes := map[string]Node{}
	for _, p := range []string{"file", "exec", "empty", "tree", "link"} {
		nodes[p] = ingestInto(t, cas, filepath.Join(dir, p), digest.BLAKE3).Node
	}
	for _, algo := range []string{"md5", "sha1", "sha256", "sha512"} {
		for p, n := range nodes {
			for _, mode := range []string{ModeFlat, ModeRecursive} {
				args := []string{"--type", algo, "--base32", filepath.Join(dir, p)}
				flatOK := p == "file" || p == "empty"
				if mode == ModeFlat {
					args = append([]string{"--flat"}, args...)
				}
				if mode == ModeFlat && !flatOK {
					want, _ := ParseOutputHash("", algo)
					if _, _, err := CheckFixed(ctx, cas, digest.BLAKE3, n, mode, want); !errors.Is(err, ErrNotRegular) {
						t.Errorf("%s %s %s: error %v, want ErrNotRegular", p, mode, algo, err)
					}
					continue
				}
				nix := algo + ":" + nixHash(t, args...)
				want, err := ParseOutputHash(nix, "")
				if err != nil {
					t.Fatal(err)
				}
				got, ok, err := CheckFixed(ctx, cas, digest.BLAKE3, n, mode, want)
				if err != nil || !ok || got != nix {
					t.Errorf("%s %s: CheckFixed = %s, %v, %v; nix-hash %s", p, mode, got, ok, err, nix)
				}
				other, _ := ParseOutputHash("", algo)
				if got, ok, _ := CheckFixed(ctx, cas, digest.BLAKE3, n, mode, other); ok || got != nix {
					t.Errorf("%s %s: CheckFixed against the zero hash = %s, %v", p, mode, got, ok)
				}
			}
		}
	}
	if _, err := FixedHash(ctx, cas, digest.BLAKE3, nodes["file"], "sideways", nixhash.SHA256); err == nil {
		t.Error("FixedHash accepted an invalid mode")
	}
}

// TestFixedOutputBuildsWithNix builds fixed-output derivations with real
// Nix whose expected hashes FixedHash computed from the same trees, flat
// and recursive: Nix must accept them. It also checks MismatchError
// against the message of a build with a wrong hash.
func TestFixedOutputBuildsWithNix(t *testing.T) {
	s := newNixStore(t)
	ctx := context.Background()
	dir := t.TempDir()
	writeFile(t, dir+"/flat", "hi\n", 0o444)
	writeFile(t, dir+"/rec/bin/run", "#!/bin/sh\n", 0o555)
	symlink(t, "bin/run", dir+"/rec/link")
	mkdir(t, dir+"/rec/empty")
	cas := newCAS()
	flat := ingestInto(t, cas, dir+"/flat", digest.SHA256).Node
	rec := ingestInto(t, cas, dir+"/rec", digest.SHA256).Node

	fod := func(name, script, hash, algo, mode string) string {
		return fmt.Sprintf(`derivation { name = %q; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
			args = [ "-e" "-c" %q ]; outputHash = %q; outputHashAlgo = %q; outputHashMode = %q; }`, name, script, hash, algo, mode)
	}
	h1, err := FixedHash(ctx, cas, digest.SHA256, flat, ModeFlat, nixhash.SHA1)
	if err != nil {
		t.Fatal(err)
	}
	h2, err := FixedHash(ctx, cas, digest.SHA256, rec, ModeRecursive, nixhash.SHA512)
	if err != nil {
		t.Fatal(err)
	}
	for _, expr := range []string{
		fod("flat", "echo hi > $out", h1.Format(nixhash.NixBase32, false), "sha1", "flat"),
		fod("rec", "mkdir -p $out/bin $out/empty; printf '#!/bin/sh\\n' > $out/bin/run; chmod +x $out/bin/run; ln -s bin/run $out/link",
			h2.Format(nixhash.SRI, true), "", "recursive"),
	} {
		if out, stderr, err := s.build(expr); err != nil {
			t.Errorf("Nix rejects the hash FixedHash computed: %v\n%s", err, stderr)
		} else {
			t.Logf("built %s", out)
		}
	}

	// A mismatch: Nix's message, with the drv path and SRI hashes.
	want, _ := ParseOutputHash("", "sha256")
	expr := fod("mismatch", "echo hi > $out", "", "sha256", "flat")
	_, stderr, err := s.build(expr)
	if err == nil {
		t.Fatal("Nix built a fixed-output derivation with the zero hash")
	}
	drv, _, err := s.instantiate(expr)
	if err != nil {
		t.Fatal(err)
	}
	got, ok, err := CheckFixed(ctx, cas, digest.SHA256, flat, ModeFlat, want)
	if err != nil || ok {
		t.Fatalf("CheckFixed = %s, %v, %v", got, ok, err)
	}
	i := strings.Index(stderr, "error: hash mismatch")
	if i < 0 {
		t.Fatalf("no mismatch error from Nix:\n%s", stderr)
	}
	lines := strings.SplitN(stderr[i+len("error: "):], "\n", 4)
	nixMsg := lines[0] + "\n" + strings.TrimPrefix(lines[1], "       ") + "\n" + strings.TrimPrefix(lines[2], "       ")
	if msg := MismatchError(drv, want, got).Error(); msg != nixMsg {
		t.Errorf("MismatchError:\n%s\nNix:\n%s", msg, nixMsg)
	}
}
