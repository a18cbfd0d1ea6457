package blobstore_test

import (
	"bytes"
	"context"
	"io"
	"runtime"
	"testing"

	"google.golang.org/grpc/codes"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/digest"
)

func TestMemoryConformance(t *testing.T) {
	// The conformance runs are independent of each other and bound by the
	// file system more than the CPU; timing-sensitive tests are not parallel.
	t.Parallel()
	for _, kind := range []blobstore.Kind{blobstore.CAS, blobstore.AC} {
		t.Run(kind.String(), func(t *testing.T) {
			blobstoretest.RunConformance(t, kind, func(t *testing.T) blobstore.BlobAccess {
				return blobstore.NewMemory(kind, 256<<20)
			})
		})
	}
}

// storedBytes returns the total size of the blobs of bs that FindMissing
// reports present. It touches them, so callers use it only at the end.
func storedBytes(t *testing.T, ba blobstore.BlobAccess, bs []blobstoretest.Blob) (total int64, present map[digest.Digest]bool) {
	t.Helper()
	present = map[digest.Digest]bool{}
	var ds []digest.Digest
	for _, b := range bs {
		ds = append(ds, b.Digest)
	}
	missing, err := ba.FindMissing(context.Background(), ds)
	if err != nil {
		t.Fatal(err)
	}
	gone := map[digest.Digest]bool{}
	for _, d := range missing {
		gone[d] = true
	}
	for _, b := range bs {
		if !gone[b.Digest] {
			present[b.Digest] = true
			total += b.Digest.Size()
		}
	}
	return total, present
}

// testLRU checks least-recently-used eviction on a CAS store bounded to
// 1000 bytes: three 300-byte blobs fit, a fourth evicts the least recently
// used one, and reading a blob (Get or FindMissing) makes it recent.
func testLRU(t *testing.T, newStore func(t *testing.T, max int64) blobstore.BlobAccess) {
	rng := blobstoretest.Rand(t)
	ba := newStore(t, 1000)
	b := func() blobstoretest.Blob { return blobstoretest.RandomBlob(rng, digest.SHA256, 300) }
	a, bb, c, d, e := b(), b(), b(), b(), b()
	for _, x := range []blobstoretest.Blob{a, bb, c} {
		blobstoretest.MustPut(t, ba, x.Digest, x.Data)
	}
	// a is the oldest; reading it makes bb the least recently used.
	blobstoretest.MustGet(t, ba, a.Digest)
	blobstoretest.MustPut(t, ba, d.Digest, d.Data)
	blobstoretest.WantAbsent(t, ba, bb.Digest)
	blobstoretest.WantBlob(t, ba, a.Digest, a.Data) // order now: a d c
	// FindMissing also extends a blob's lifetime: touch c, so d is evicted.
	if !blobstoretest.Present(t, ba, c.Digest) {
		t.Fatal("c was evicted too early")
	}
	blobstoretest.MustPut(t, ba, e.Digest, e.Data)
	blobstoretest.WantAbsent(t, ba, d.Digest)
	for _, x := range []blobstoretest.Blob{a, c, e} {
		blobstoretest.WantBlob(t, ba, x.Digest, x.Data)
	}

	// A blob larger than the store is refused.
	big := blobstoretest.RandomBlob(rng, digest.SHA256, 1001)
	err := ba.Put(context.Background(), big.Digest, blobstoretest.StreamReader(big.Data))
	blobstoretest.WantCode(t, err, codes.ResourceExhausted, "Put of a blob larger than the store")
	blobstoretest.WantAbsent(t, ba, big.Digest)
	// A blob of exactly the maximum size fits, alone.
	exact := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
	blobstoretest.MustPut(t, ba, exact.Digest, exact.Data)
	blobstoretest.WantBlob(t, ba, exact.Digest, exact.Data)

	// Random traffic never exceeds the bound, and the most recent blob
	// always survives.
	all := []blobstoretest.Blob{a, bb, c, d, e, exact}
	for i := 0; i < 200; i++ {
		x := blobstoretest.RandomBlob(rng, digest.SHA256, rng.IntN(400))
		blobstoretest.MustPut(t, ba, x.Digest, x.Data)
		all = append(all, x)
		if total, present := storedBytes(t, ba, all); total > 1000 || !present[x.Digest] {
			t.Fatalf("after %d Puts: %d bytes stored (max 1000), newest present: %v", i+1, total, present[x.Digest])
		}
	}
}

func TestMemoryLRU(t *testing.T) {
	testLRU(t, func(t *testing.T, max int64) blobstore.BlobAccess {
		return blobstore.NewMemory(blobstore.CAS, max)
	})
}

func TestMemoryACOverwriteAccounting(t *testing.T) {
	// Overwriting an action cache entry accounts for the new size only:
	// shrinking a large entry makes room for others.
	rng := blobstoretest.Rand(t)
	ba := blobstore.NewMemory(blobstore.AC, 1000)
	a := blobstoretest.RandomBlob(rng, digest.SHA256, 10).Digest
	blobstoretest.MustPut(t, ba, a, make([]byte, 900))
	blobstoretest.MustPut(t, ba, a, make([]byte, 10))
	var others []digest.Digest
	for i := 0; i < 3; i++ {
		d := blobstoretest.RandomBlob(rng, digest.SHA256, 10).Digest
		blobstoretest.MustPut(t, ba, d, make([]byte, 300))
		others = append(others, d)
	}
	for _, d := range append(others, a) {
		if !blobstoretest.Present(t, ba, d) {
			t.Fatalf("%s was evicted although 910 of 1000 bytes are used", d.Sprint())
		}
	}
}

// TestMemoryStreamedPutAllocation checks that storing a streamed blob
// allocates about its size once: the memory store keeps what Put read, so
// any slack in that buffer is memory the size bound does not see.
func TestMemoryStreamedPutAllocation(t *testing.T) {
	const size = 16 << 20
	b := blobstoretest.RandomBlob(blobstoretest.Rand(t), digest.SHA256, size)
	ba := blobstore.NewMemory(blobstore.CAS, 1<<30)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	// A plain reader, which returns io.EOF by itself after the data.
	r := struct{ io.Reader }{bytes.NewReader(b.Data)}
	if err := ba.Put(context.Background(), b.Digest, r); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	// Once would be size; the race detector's build allocates Buffer.Grow's
	// buffer twice. Before the fix it was three times (and twice kept).
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size*5/2 {
		t.Errorf("Put of a streamed %d-byte blob allocated %d bytes", size, alloc)
	}
	got, err := blobstore.GetBytes(context.Background(), ba, b.Digest, size)
	if err != nil {
		t.Fatal(err)
	}
	if cap(got) > size*3/2 {
		t.Errorf("the store keeps the %d-byte blob in a buffer of %d bytes", size, cap(got))
	}
	runtime.KeepAlive(ba)
}
