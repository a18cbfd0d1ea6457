package nar

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/storepath/references"

	"tvixfarm/cas/digest"
)

// Benchmark fixtures, built once per process.
var (
	fixtureOnce sync.Once
	fixtureDir  string
	fixtureErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fixtureDir != "" {
		os.RemoveAll(fixtureDir)
	}
	os.Exit(code)
}

// benchTrees are the trees of the benchmarks: 1,000 small files (100 to
// 4,000 bytes, 2 MB in all) in 10 directories, and one 100 MB file.
var benchTrees = []string{"small-files-1000", "file-100MB"}

func fixture(b *testing.B, name string) string {
	b.Helper()
	fixtureOnce.Do(func() {
		fixtureDir, fixtureErr = os.MkdirTemp("", "tvixfarm-nar-bench-")
		if fixtureErr != nil {
			return
		}
		smallTree(b, filepath.Join(fixtureDir, benchTrees[0]), 1000)
		writeFile(b, filepath.Join(fixtureDir, benchTrees[1]), string(randomData(42, 100<<20)), 0o444)
	})
	if fixtureErr != nil {
		b.Fatal(fixtureErr)
	}
	return filepath.Join(fixtureDir, name)
}

// BenchmarkWrite writes the NAR of each tree from a memory CAS to
// io.Discard, and to a Hasher (Info's work).
func BenchmarkWrite(b *testing.B) {
	ctx := context.Background()
	for _, name := range benchTrees {
		path := fixture(b, name)
		cas := newCAS()
		ing := ingestInto(b, cas, path, digest.SHA256)
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(ing.NarSize))
			for b.Loop() {
				if err := Write(ctx, cas, digest.SHA256, ing.Node, io.Discard); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/hasher", func(b *testing.B) {
			b.SetBytes(int64(ing.NarSize))
			cands := candidates(1000)
			for b.Loop() {
				if _, err := Info(ctx, cas, digest.SHA256, ing.Node, cands); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDump dumps each tree from the local file system to io.Discard,
// with this package, with go-nix's nar.DumpPath, and with nix-store
// --dump (a process per NAR, writing to /dev/null).
func BenchmarkDump(b *testing.B) {
	for _, name := range benchTrees {
		path := fixture(b, name)
		var size int64
		{
			cw := &countWriter{}
			if err := Dump(path, cw); err != nil {
				b.Fatal(err)
			}
			size = cw.n
		}
		b.Run(name+"/nar.Dump", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if err := Dump(path, io.Discard); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/go-nix", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if err := nar.DumpPath(io.Discard, path); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/nix-store", func(b *testing.B) {
			nixStore := nixTool(b, "nix-store")
			devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer devNull.Close()
			b.SetBytes(size)
			for b.Loop() {
				cmd := exec.Command(nixStore, "--dump", path)
				cmd.Stdout = devNull
				if err := cmd.Run(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkIngest ingests each tree (blob digests and NAR hash in one
// pass).
func BenchmarkIngest(b *testing.B) {
	for _, name := range benchTrees {
		path := fixture(b, name)
		for _, fn := range digest.Functions {
			b.Run(name+"/"+fn.String(), func(b *testing.B) {
				var size uint64
				for b.Loop() {
					ing, err := Ingest(context.Background(), path, fn)
					if err != nil {
						b.Fatal(err)
					}
					size = ing.NarSize
				}
				b.SetBytes(int64(size))
			})
		}
	}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// candidates returns n store paths.
func candidates(n int) []string {
	cs := make([]string, n)
	for i := range cs {
		cs[i] = "/nix/store/" + nixbase32.EncodeToString(randomData(uint64(i)+5000, 20)) + "-c" + strconv.Itoa(i)
	}
	return cs
}

// scanInputs are the data the scanners read: random bytes (compiled
// code, compressed data), text, and nix32 characters only (the worst
// case: every position starts a window).
func scanInputs() map[string][]byte {
	const size = 64 << 20
	text := make([]byte, 0, size)
	line := []byte("The quick brown fox jumps over the lazy dog; see /nix/store/" + nixbase32.EncodeToString(randomData(1, 20)) + "-foo/bin/sh\n")
	for len(text)+len(line) <= size {
		text = append(text, line...)
	}
	nix32 := randomData(3, size)
	for i := range nix32 {
		nix32[i] = nixbase32.Alphabet[nix32[i]%32]
	}
	return map[string][]byte{"random": randomData(2, size), "text": text, "nix32": nix32}
}

// BenchmarkHasher measures Hasher (SHA-256 and reference scanning) over
// writes of 128 KiB, as Write makes them, with 0 and 1,000 candidates.
func BenchmarkHasher(b *testing.B) {
	inputs := scanInputs()
	for _, in := range []string{"random", "text", "nix32"} {
		data := inputs[in]
		for _, n := range []int{0, 1000} {
			cands := candidates(n)
			b.Run(in+"/candidates-"+strconv.Itoa(n), func(b *testing.B) {
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					h, err := NewHasher(cands)
					if err != nil {
						b.Fatal(err)
					}
					for i := 0; i < len(data); i += bufSize {
						h.Write(data[i:min(len(data), i+bufSize)])
					}
					h.Sum()
				}
			})
		}
	}
}

// BenchmarkScanner compares Scanner with go-nix's ReferenceScanner.
func BenchmarkScanner(b *testing.B) {
	inputs := scanInputs()
	cands := candidates(1000)
	for _, in := range []string{"random", "text", "nix32"} {
		data := inputs[in]
		b.Run(in+"/nar.Scanner", func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				s, _ := NewScanner(cands)
				for i := 0; i < len(data); i += bufSize {
					s.Write(data[i:min(len(data), i+bufSize)])
				}
			}
		})
		b.Run(in+"/go-nix", func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				s, _ := references.NewReferenceScanner(cands)
				for i := 0; i < len(data); i += bufSize {
					s.Write(data[i:min(len(data), i+bufSize)])
				}
			}
		})
	}
}
