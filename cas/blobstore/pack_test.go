package blobstore

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tvixfarm/cas/digest"
)

func newPacked(t *testing.T, dir string, max int64) *disk {
	t.Helper()
	ba, err := NewDisk(CAS, dir, DiskOptions{MaxSize: max, PackBelow: 64 << 10, PackSize: 64 << 10, VerifyBelow: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return ba.(*disk)
}

func randomBlob(t *testing.T, fn digest.Function, n int) ([]byte, digest.Digest) {
	b := make([]byte, n)
	rand.Read(b)
	return b, digest.Compute(fn, b)
}

func mustGet(t *testing.T, ba BlobAccess, d digest.Digest) []byte {
	t.Helper()
	b, err := GetBytes(context.Background(), ba, d, 1<<30)
	if err != nil {
		t.Fatalf("get %s: %v", d, err)
	}
	return b
}

func TestPackRoundTripAndReopen(t *testing.T) {
	dir := t.TempDir()
	s := newPacked(t, dir, 1<<30)
	ctx := context.Background()
	var ds []digest.Digest
	var blobs [][]byte
	for i := 0; i < 3000; i++ {
		b, d := randomBlob(t, digest.Functions[i%2], 1+i%200)
		if err := PutBytes(ctx, s, d, b); err != nil {
			t.Fatal(err)
		}
		ds, blobs = append(ds, d), append(blobs, b)
	}
	if len(s.packs) < 3 {
		t.Fatalf("expected several packs, got %d", len(s.packs))
	}
	s.Close()
	s = newPacked(t, dir, 1<<30)
	defer s.Close()
	missing, _ := s.FindMissing(ctx, ds)
	if len(missing) != 0 {
		t.Fatalf("%d blobs missing after reopen", len(missing))
	}
	for i, d := range ds {
		if string(mustGet(t, s, d)) != string(blobs[i]) {
			t.Fatalf("blob %d differs", i)
		}
	}
}

func TestPackTornTailTruncated(t *testing.T) {
	dir := t.TempDir()
	s := newPacked(t, dir, 1<<30)
	ctx := context.Background()
	b1, d1 := randomBlob(t, digest.SHA256, 100)
	b2, d2 := randomBlob(t, digest.SHA256, 100)
	PutBytes(ctx, s, d1, b1)
	PutBytes(ctx, s, d2, b2)
	name := s.packs[len(s.packs)-1].f.Name()
	s.Close()
	// Tear the second record: drop its last 10 bytes.
	fi, _ := os.Stat(name)
	os.Truncate(name, fi.Size()-10)
	s = newPacked(t, dir, 1<<30)
	defer s.Close()
	if string(mustGet(t, s, d1)) != string(b1) {
		t.Fatal("intact record lost")
	}
	if _, err := s.Get(ctx, d2); !IsNotFound(err) {
		t.Fatalf("torn record: got %v, want NotFound", err)
	}
	fi, _ = os.Stat(name)
	if fi.Size() != packHeaderLen+100 {
		t.Fatalf("pack not truncated to its intact prefix: %d bytes", fi.Size())
	}
}

func TestPackCorruptRecordNotServed(t *testing.T) {
	dir := t.TempDir()
	s := newPacked(t, dir, 1<<30)
	defer s.Close()
	ctx := context.Background()
	b, d := randomBlob(t, digest.BLAKE3, 100)
	PutBytes(ctx, s, d, b)
	f, _ := os.OpenFile(s.packs[len(s.packs)-1].f.Name(), os.O_RDWR, 0)
	f.WriteAt([]byte{b[0] ^ 0xff}, packHeaderLen)
	f.Close()
	if _, err := s.Get(ctx, d); !IsNotFound(err) {
		t.Fatalf("corrupt record: got %v, want NotFound", err)
	}
	if m, _ := s.FindMissing(ctx, []digest.Digest{d}); len(m) != 1 {
		t.Fatal("corrupt record still indexed")
	}
}

func TestPackEvictionKeepsHotBlobs(t *testing.T) {
	dir := t.TempDir()
	const max = 1 << 20
	s := newPacked(t, dir, max)
	defer s.Close()
	ctx := context.Background()
	hot, hd := randomBlob(t, digest.SHA256, 1000)
	PutBytes(ctx, s, hd, hot)
	var first digest.Digest
	for i := 0; i < 5000; i++ {
		b, d := randomBlob(t, digest.SHA256, 1000)
		if i == 0 {
			first = d
		}
		if err := PutBytes(ctx, s, d, b); err != nil {
			t.Fatal(err)
		}
		if i%100 == 0 {
			if m, _ := s.FindMissing(ctx, []digest.Digest{hd}); len(m) != 0 {
				t.Fatalf("hot blob evicted after %d writes", i)
			}
		}
	}
	if m, _ := s.FindMissing(ctx, []digest.Digest{first}); len(m) != 1 {
		t.Fatal("cold blob was not evicted")
	}
	var onDisk int64
	ents, _ := os.ReadDir(filepath.Join(dir, "packs"))
	for _, e := range ents {
		if fi, err := e.Info(); err == nil { // packs and indexes come and go meanwhile
			onDisk += fi.Size()
		}
	}
	if onDisk > max+s.opts.PackSize {
		t.Fatalf("packs use %d bytes, max %d", onDisk, max)
	}
	if string(mustGet(t, s, hd)) != string(hot) {
		t.Fatal("hot blob corrupted")
	}
	_ = io.EOF
	_ = fmt.Sprint
}

// TestPackTruncatedUnderMapping: a pack file cut short by someone else while
// the store runs makes the records behind the cut missing; it must not
// crash the process (the mapping would fault with SIGBUS).
func TestPackTruncatedUnderMapping(t *testing.T) {
	s := newPacked(t, t.TempDir(), 1<<30)
	defer s.Close()
	ctx := context.Background()
	var ds []digest.Digest
	for i := 0; i < 100; i++ {
		b, d := randomBlob(t, digest.SHA256, 1000)
		PutBytes(ctx, s, d, b)
		ds = append(ds, d)
	}
	p := s.packs[len(s.packs)-1]
	if p.data == nil {
		t.Skip("pack is not mapped")
	}
	os.Truncate(p.f.Name(), 0)
	last := ds[len(ds)-1]
	if _, err := s.Get(ctx, last); !IsNotFound(err) {
		t.Fatalf("a record behind the cut: got %v, want NotFound", err)
	}
	if m, _ := s.FindMissing(ctx, []digest.Digest{last}); len(m) != 1 {
		t.Fatal("the lost record is still indexed")
	}
}

// TestPackIndex: sealed packs get an index, opening the store uses it, and
// a damaged or stale index is ignored (the pack is scanned instead).
func TestPackIndex(t *testing.T) {
	dir := t.TempDir()
	s := newPacked(t, dir, 1<<30)
	ctx := context.Background()
	blobs := map[digest.Digest][]byte{}
	for i := 0; i < 2000; i++ {
		b, d := randomBlob(t, digest.Functions[i%2], 1+i%300)
		if err := PutBytes(ctx, s, d, b); err != nil {
			t.Fatal(err)
		}
		blobs[d] = b
	}
	s.Close()
	idx, _ := filepath.Glob(filepath.Join(dir, "packs", "*.idx"))
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*.pack"))
	if len(idx) < 2 || len(idx) >= len(packs)+1 {
		t.Fatalf("%d indexes for %d packs", len(idx), len(packs))
	}
	check := func(what string) {
		t.Helper()
		s := newPacked(t, dir, 1<<30)
		defer s.Close()
		for d, b := range blobs {
			if got := mustGet(t, s, d); string(got) != string(b) {
				t.Fatalf("%s: blob %s differs", what, d)
			}
		}
	}
	check("with indexes")
	// Damage one index, make another stale (its pack grew), orphan a third.
	os.WriteFile(idx[0], []byte("TFX1 garbage"), 0o644)
	f, _ := os.OpenFile(strings.TrimSuffix(idx[1], ".idx")+".pack", os.O_WRONLY|os.O_APPEND, 0)
	f.Write(make([]byte, 10)) // a torn record, as after a crash
	f.Close()
	os.WriteFile(filepath.Join(dir, "packs", indexName(999999)), []byte("orphan"), 0o644)
	check("with a damaged and a stale index")
	if _, err := os.Stat(filepath.Join(dir, "packs", indexName(999999))); err == nil {
		t.Error("orphan index not removed")
	}
}
