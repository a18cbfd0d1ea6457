package nar

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// treeCases are the trees whose NAR must be the one real Nix writes. Each
// builds an object at root, which does not exist yet.
var treeCases = []struct {
	name  string
	build func(t testing.TB, root string)
}{
	{"nested", func(t testing.TB, root string) {
		writeFile(t, root+"/bin/hello", "#!/bin/sh\necho hello\n", 0o755)
		writeFile(t, root+"/share/doc/README", "read me\n", 0o644)
		writeFile(t, root+"/share/doc/deeper/still/file", "deep", 0o444)
		mkdir(t, root+"/share/empty")
		mkdir(t, root+"/lib/empty/nested-empty")
		writeFile(t, root+"/lib/libx.so", strings.Repeat("\x7fELF", 1000), 0o555)
		writeFile(t, root+"/mode011", "group and other may run me, the owner may not", 0o011)
		writeFile(t, root+"/mode100", "only the owner may run me", 0o100)
		writeFile(t, root+"/mode700", "x", 0o700)
		writeFile(t, root+"/mode000", "nobody may read me, but root does", 0o000)
		symlink(t, "../share/doc/README", root+"/bin/relative")
		symlink(t, "/nix/store/00000000000000000000000000000000-absolute", root+"/absolute")
		symlink(t, "does/not/exist", root+"/dangling")
		symlink(t, "share", root+"/to-dir")
		symlink(t, ".", root+"/dot")
	}},
	{"names", func(t testing.TB, root string) {
		for _, n := range []string{"B", "Z", "_", "a", "a.b", "a-b", "a b", "aa", "A", "~", "-", "0", "9",
			"\u00e9", "e\u0301", "日本語", "x\ny", "tab\there", "emoji-🙂", "quote\"'", "back\\slash",
			strings.Repeat("n", 255)} {
			writeFile(t, filepath.Join(root, n), n, 0o444)
		}
		// Types interleave in name order.
		mkdir(t, root+"/m")
		writeFile(t, root+"/l", "l", 0o444)
		symlink(t, "m", root+"/n")
		mkdir(t, root+"/k/a")
		writeFile(t, root+"/k.txt", "", 0o444)
		writeFile(t, root+"/k-", "", 0o444)
	}},
	{"padding", func(t testing.TB, root string) {
		for i := 0; i <= 17; i++ {
			writeFile(t, filepath.Join(root, strings.Repeat("p", i+1)), strings.Repeat("c", i), 0o444)
			symlink(t, strings.Repeat("t", i+1), filepath.Join(root, "l"+strings.Repeat("q", i)))
		}
	}},
	{"empty-files", func(t testing.TB, root string) {
		writeFile(t, root+"/empty", "", 0o444)
		writeFile(t, root+"/empty-exec", "", 0o555)
		writeFile(t, root+"/sub/empty", "", 0o444)
	}},
	{"hardlinks", func(t testing.TB, root string) {
		writeFile(t, root+"/a", "same inode", 0o444)
		if err := os.Link(root+"/a", root+"/b"); err != nil {
			t.Fatal(err)
		}
		writeFile(t, root+"/c", "same inode", 0o555) // Same contents, executable.
	}},
	{"unreadable-dir", func(t testing.TB, root string) {
		writeFile(t, root+"/locked/inside", "root reads it", 0o444)
		if err := os.Chmod(root+"/locked", 0); err != nil {
			t.Fatal(err)
		}
	}},
	{"deep", func(t testing.TB, root string) {
		p := root
		for i := 0; i < 60; i++ {
			p = filepath.Join(p, "d")
		}
		writeFile(t, p+"/leaf", "leaf", 0o444)
	}},
	{"empty-dir", func(t testing.TB, root string) { mkdir(t, root) }},
	{"file", func(t testing.TB, root string) { writeFile(t, root, "just a file\n", 0o444) }},
	{"exec-file", func(t testing.TB, root string) { writeFile(t, root, "#!/bin/sh\n", 0o555) }},
	{"empty-file", func(t testing.TB, root string) { writeFile(t, root, "", 0o444) }},
	{"symlink", func(t testing.TB, root string) { symlink(t, "/nix/store/nowhere", root) }},
	{"small-files", func(t testing.TB, root string) { smallTree(t, root, 300) }},
	{"large", func(t testing.TB, root string) {
		writeFile(t, root+"/large", string(randomData(1, 50<<20+3)), 0o444)
		writeFile(t, root+"/large-exec", string(randomData(2, 3<<20)), 0o555)
		writeFile(t, root+"/almost-prefetched", string(randomData(3, prefetchBelow-1)), 0o444)
		writeFile(t, root+"/just-streamed", string(randomData(3, prefetchBelow)), 0o444)
		writeFile(t, root+"/small", "small", 0o444)
	}},
}

// TestTreesMatchNix checks, for every tree case, that Dump, Ingest (NAR
// hash and size), Write from the CAS after Upload, and Info all agree with
// `nix-store --dump` and `nix-hash`.
func TestTreesMatchNix(t *testing.T) {
	ctx := context.Background()
	for _, tc := range treeCases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "large" && testing.Short() {
				t.Skip("large file in -short mode")
			}
			root := filepath.Join(t.TempDir(), "store-path")
			tc.build(t, root)
			want := nixStoreDump(t, root)
			wantHash := sha256.Sum256(want)
			if got := nixHash(t, "--type", "sha256", "--base32", root); got != nixbase32.EncodeToString(wantHash[:]) {
				t.Fatalf("nix-hash %s, sha256 of nix-store --dump %s", got, nixbase32.EncodeToString(wantHash[:]))
			}

			var dumped bytes.Buffer
			if err := Dump(root, &dumped); err != nil {
				t.Fatalf("Dump: %v", err)
			}
			checkSameNAR(t, "Dump", dumped.Bytes(), want)

			for _, fn := range digest.Functions {
				cas := &countingCAS{BlobAccess: newCAS()}
				ing := ingestInto(t, cas, root, fn)
				if ing.NarHash != wantHash || ing.NarSize != uint64(len(want)) {
					t.Errorf("%s: Ingest: NAR %x/%d, want %x/%d", fn, ing.NarHash, ing.NarSize, wantHash, len(want))
				}
				if fn == digest.SHA256 {
					t.Logf("%d blobs, %d puts, %d FindMissing calls", len(ing.Blobs), cas.puts.Load(), cas.finds.Load())
				}
				// A second Upload finds everything and stores nothing.
				puts := cas.puts.Load()
				if err := Upload(ctx, cas, ing); err != nil {
					t.Fatal(err)
				}
				if cas.puts.Load() != puts {
					t.Errorf("%s: second Upload stored %d blobs", fn, cas.puts.Load()-puts)
				}

				var written bytes.Buffer
				if err := Write(ctx, cas, fn, ing.Node, &written); err != nil {
					t.Fatalf("%s: Write: %v", fn, err)
				}
				checkSameNAR(t, fn.String()+": Write", written.Bytes(), want)

				info, err := Info(ctx, cas, fn, ing.Node, nil)
				if err != nil {
					t.Fatal(err)
				}
				if info.NarHash != wantHash || info.NarSize != uint64(len(want)) || info.References != nil {
					t.Errorf("%s: Info = %s/%d %v, want %x/%d", fn, info.NarHashString(), info.NarSize, info.References, wantHash, len(want))
				}
			}
		})
	}
}

// checkSameNAR fails with the first difference between two NARs.
func checkSameNAR(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	lo := max(0, i-32)
	t.Fatalf("%s: NAR differs from nix-store --dump at byte %d of %d (want %d bytes):\n got  %q\n want %q",
		what, i, len(got), len(want), got[lo:min(len(got), i+32)], want[lo:min(len(want), i+32)])
}

// TestNonUTF8 checks that names and symlink targets that are not UTF-8
// dump as Nix dumps them, and fail Ingest with the path escaped.
func TestNonUTF8(t *testing.T) {
	ctx := context.Background()
	t.Run("name", func(t *testing.T) {
		root := filepath.Join(t.TempDir(), "p")
		writeFile(t, root+"/ok", "ok", 0o444)
		writeFile(t, root+"/sub/bad-\xff\xfe-name", "latin-1", 0o444)
		var b bytes.Buffer
		if err := Dump(root, &b); err != nil {
			t.Fatalf("Dump: %v", err)
		}
		checkSameNAR(t, "Dump", b.Bytes(), nixStoreDump(t, root))
		_, err := Ingest(ctx, root, digest.SHA256)
		if err == nil {
			t.Fatal("Ingest accepted a name that is not UTF-8")
		}
		if !strings.Contains(err.Error(), `sub/bad-\xff\xfe-name"`) || !strings.Contains(err.Error(), "UTF-8") {
			t.Errorf("error %q does not name the path, escaped", err)
		}
		t.Logf("error: %v", err)
	})
	t.Run("target", func(t *testing.T) {
		root := filepath.Join(t.TempDir(), "p")
		symlink(t, "target-\xe9", root+"/link")
		var b bytes.Buffer
		if err := Dump(root, &b); err != nil {
			t.Fatalf("Dump: %v", err)
		}
		checkSameNAR(t, "Dump", b.Bytes(), nixStoreDump(t, root))
		_, err := Ingest(ctx, root, digest.BLAKE3)
		if err == nil || !strings.Contains(err.Error(), `target-\xe9`) {
			t.Errorf("Ingest: error %v, want one naming the target, escaped", err)
		}
	})
}

// TestUnsupportedTypes checks that a FIFO fails Dump and Ingest, as it
// fails nix-store --dump.
func TestUnsupportedTypes(t *testing.T) {
	root := filepath.Join(t.TempDir(), "p")
	mkdir(t, root)
	if err := syscall.Mkfifo(root+"/fifo", 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Dump(root, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "fifo") {
		t.Errorf("Dump: error %v, want one naming the FIFO", err)
	}
	if _, err := Ingest(context.Background(), root, digest.SHA256); err == nil {
		t.Error("Ingest accepted a FIFO")
	}
	if err := Dump(filepath.Join(root, "missing"), &bytes.Buffer{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Dump of a missing path: %v", err)
	}
}

// TestIngestBlobs checks what Ingest keeps in memory, and that Upload
// stores only what the CAS lacks, with one FindMissing call.
func TestIngestBlobs(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "p")
	writeFile(t, root+"/small", "small", 0o444)
	writeFile(t, root+"/dup", "small", 0o555)
	writeFile(t, root+"/big", string(randomData(9, keepBelow+1)), 0o444)
	writeFile(t, root+"/huge", string(randomData(10, 2*batchBelow)), 0o444)
	writeFile(t, root+"/empty", "", 0o444)
	mkdir(t, root+"/e1")
	mkdir(t, root+"/e2")
	ing, err := Ingest(ctx, root, digest.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	var inMemory, byPath int
	for _, b := range ing.Blobs {
		switch {
		case b.Data != nil && b.Path == "":
			inMemory++
		case b.Data == nil && strings.HasPrefix(b.Path, root+"/"):
			byPath++
		default:
			t.Errorf("blob %+v has neither data nor path", b)
		}
		if b.Digest.Size() == 0 {
			t.Errorf("the empty blob is listed")
		}
	}
	for _, b := range ing.Blobs {
		if b.Data != nil && digest.Compute(digest.SHA256, b.Data) != b.Digest {
			t.Errorf("blob %s: data does not match", b.Digest)
		}
	}
	// In memory: small (once: dup has the same contents) and the root
	// Directory (the empty directories' message is the empty blob). By
	// path: big and huge.
	if inMemory != 2 || byPath != 2 {
		t.Errorf("%d blobs in memory, %d by path; want 2 and 2", inMemory, byPath)
	}

	cas := &countingCAS{BlobAccess: newCAS()}
	// Store one blob first: Upload must not store it again.
	if err := blobstore.PutBytes(ctx, cas, digest.Compute(digest.SHA256, []byte("small")), []byte("small")); err != nil {
		t.Fatal(err)
	}
	puts := cas.puts.Load()
	if err := Upload(ctx, cas, ing); err != nil {
		t.Fatal(err)
	}
	if got := cas.puts.Load() - puts; got != int64(len(ing.Blobs)-1) || cas.finds.Load() != 1 {
		t.Errorf("Upload: %d puts and %d FindMissing calls, want %d and 1", got, cas.finds.Load(), len(ing.Blobs)-1)
	}
	var b bytes.Buffer
	if err := Write(ctx, cas, digest.SHA256, ing.Node, &b); err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(b.Bytes()) != ing.NarHash {
		t.Error("Write after Upload does not give Ingest's NAR hash")
	}

	// A file changed after Ingest fails Upload (the CAS verifies).
	if err := os.Chmod(root+"/huge", 0o644); err != nil {
		t.Fatal(err)
	}
	writeFile(t, root+"/huge", string(randomData(11, 2*batchBelow)), 0o444)
	if err := Upload(ctx, newCAS(), ing); err == nil {
		t.Error("Upload stored a file that changed since Ingest")
	}
}
