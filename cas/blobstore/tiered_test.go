package blobstore_test

import (
	"bytes"
	"context"
	"io"
	"testing"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/digest"
)

type tieredStores struct {
	tiered, local, remote blobstore.BlobAccess
	localDir              string // set when local is a disk store
}

// newTiered returns a tiered store with a memory store of localMax bytes
// (or a disk store, if localMax is 0) in front of a disk store.
func newTiered(t testing.TB, kind blobstore.Kind, localMax int64) tieredStores {
	var ts tieredStores
	if localMax > 0 {
		ts.local = blobstore.NewMemory(kind, localMax)
	} else {
		ts.localDir = t.TempDir()
		ts.local = openDisk(t, kind, ts.localDir, blobstore.DiskOptions{MaxSize: 1 << 30})
	}
	ts.remote = openDisk(t, kind, t.TempDir(), blobstore.DiskOptions{MaxSize: 1 << 30})
	ts.tiered = blobstore.NewTiered(ts.local, ts.remote)
	return ts
}

func TestTieredConformance(t *testing.T) {
	// The conformance runs are independent of each other and bound by the
	// file system more than the CPU; timing-sensitive tests are not parallel.
	t.Parallel()
	for _, kind := range []blobstore.Kind{blobstore.CAS, blobstore.AC} {
		t.Run(kind.String(), func(t *testing.T) {
			blobstoretest.RunConformance(t, kind, func(t *testing.T) blobstore.BlobAccess {
				return newTiered(t, kind, 256<<20).tiered
			})
		})
	}
}

func TestTieredReadThrough(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, local := range []struct {
		name string
		max  int64
	}{{"memory", 256 << 20}, {"disk", 0}} {
		t.Run(local.name, func(t *testing.T) {
			ts := newTiered(t, blobstore.CAS, local.max)
			for _, fn := range digest.Functions {
				for _, n := range []int{0, 100, 1<<20 + 1, blobstoretest.LargeBlobSize} {
					b := blobstoretest.RandomBlob(rng, fn, n)
					blobstoretest.MustPut(t, ts.remote, b.Digest, b.Data)
					blobstoretest.WantAbsent(t, ts.local, b.Digest)
					blobstoretest.WantBlob(t, ts.tiered, b.Digest, b.Data)
					// Once the caller has read the blob to the end and closed
					// it, the local store has it.
					blobstoretest.WantBlob(t, ts.local, b.Digest, b.Data)
				}
			}
		})
	}
	t.Run("action cache", func(t *testing.T) {
		ts := newTiered(t, blobstore.AC, 256<<20)
		action := blobstoretest.RandomBlob(rng, digest.SHA256, 99).Digest
		v := blobstoretest.RandomBytes(rng, 777)
		blobstoretest.MustPut(t, ts.remote, action, v)
		blobstoretest.WantBlob(t, ts.tiered, action, v)
		blobstoretest.WantBlob(t, ts.local, action, v)
	})
}

func TestTieredReadThroughLocalTooSmall(t *testing.T) {
	// A blob that does not fit the local store is still served.
	rng := blobstoretest.Rand(t)
	ts := newTiered(t, blobstore.CAS, 1000)
	b := blobstoretest.RandomBlob(rng, digest.SHA256, 1<<20)
	blobstoretest.MustPut(t, ts.remote, b.Digest, b.Data)
	for i := 0; i < 2; i++ {
		blobstoretest.WantBlob(t, ts.tiered, b.Digest, b.Data)
	}
	blobstoretest.WantAbsent(t, ts.local, b.Digest)
}

func TestTieredWriteThrough(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, kind := range []blobstore.Kind{blobstore.CAS, blobstore.AC} {
		t.Run(kind.String(), func(t *testing.T) {
			ts := newTiered(t, kind, 256<<20)
			for _, fn := range digest.Functions {
				for _, rd := range blobstoretest.Readers {
					for _, n := range []int{0, 100, 2 << 20} {
						b := blobstoretest.RandomBlob(rng, fn, n)
						if err := ts.tiered.Put(context.Background(), b.Digest, rd.New(b.Data)); err != nil {
							t.Fatalf("Put: %v", err)
						}
						blobstoretest.WantBlob(t, ts.local, b.Digest, b.Data)
						blobstoretest.WantBlob(t, ts.remote, b.Digest, b.Data)
					}
				}
			}
		})
	}
}

func TestTieredFailedPutStoresNowhere(t *testing.T) {
	rng := blobstoretest.Rand(t)
	ts := newTiered(t, blobstore.CAS, 256<<20)
	b := blobstoretest.RandomBlob(rng, digest.SHA256, 1<<20)
	for _, r := range []io.Reader{
		blobstoretest.ErrAfterReader(b.Data, len(b.Data)),
		blobstoretest.StreamReader(b.Data[1:]),
		blobstoretest.StreamReader(append(bytes.Clone(b.Data), 0)),
	} {
		if err := ts.tiered.Put(context.Background(), b.Digest, r); err == nil {
			t.Fatal("Put of bad data succeeded")
		}
		blobstoretest.WantAbsent(t, ts.local, b.Digest)
		blobstoretest.WantAbsent(t, ts.remote, b.Digest)
	}
}

func TestTieredAbandonedGetLeavesNoPartialBlob(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, local := range []struct {
		name string
		max  int64
	}{{"memory", 256 << 20}, {"disk", 0}} {
		t.Run(local.name, func(t *testing.T) {
			ts := newTiered(t, blobstore.CAS, local.max)
			const n = 2 << 20
			b := blobstoretest.RandomBlob(rng, digest.BLAKE3, n)
			blobstoretest.MustPut(t, ts.remote, b.Digest, b.Data)
			for _, read := range []int{0, 1, 1000, n / 2, n - 1} {
				rc, err := ts.tiered.Get(context.Background(), b.Digest)
				if err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, read)
				if _, err := io.ReadFull(rc, buf); err != nil {
					t.Fatalf("reading %d bytes: %v", read, err)
				}
				if !bytes.Equal(buf, b.Data[:read]) {
					t.Fatalf("first %d bytes differ", read)
				}
				if err := rc.Close(); err != nil {
					t.Fatalf("Close after %d bytes: %v", read, err)
				}
				blobstoretest.WantAbsent(t, ts.local, b.Digest)
				if ts.localDir != "" {
					wantTmpEmpty(t, ts.localDir)
					if files := blobFiles(t, ts.localDir); len(files) != 0 {
						t.Fatalf("abandoned Get left files in the local store: %v", files)
					}
				}
			}
			// Reading to the end fills the local store.
			blobstoretest.WantBlob(t, ts.tiered, b.Digest, b.Data)
			blobstoretest.WantBlob(t, ts.local, b.Digest, b.Data)
		})
	}
}

func TestTieredFillsLocalWithoutReadingEOF(t *testing.T) {
	ctx := context.Background()
	local := blobstore.NewMemory(blobstore.CAS, 1<<20)
	remote := blobstore.NewMemory(blobstore.CAS, 1<<20)
	data := []byte("read exactly the size, then close")
	d := digest.Compute(digest.SHA256, data)
	if err := blobstore.PutBytes(ctx, remote, d, data); err != nil {
		t.Fatal(err)
	}
	rc, err := blobstore.NewTiered(local, remote).Get(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(data))
	if _, err := io.ReadFull(rc, buf); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if m, _ := local.FindMissing(ctx, []digest.Digest{d}); len(m) != 0 {
		t.Fatal("local store not filled by a reader that stopped at the size")
	}
}
