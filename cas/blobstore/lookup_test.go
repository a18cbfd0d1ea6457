package blobstore_test

import (
	"bytes"
	"context"
	"testing"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// TestLookupHash: BLAKE3 blobs are found by hash alone in memory and disk
// stores (small ones in packs, large ones as files), also after a restart,
// and not after eviction; SHA-256 blobs are not indexed.
func TestLookupHash(t *testing.T) {
	ctx := context.Background()
	small := []byte("castore")
	large := bytes.Repeat([]byte{7}, 200<<10)
	ds := digest.Compute(digest.BLAKE3, small)
	dl := digest.Compute(digest.BLAKE3, large)
	sha := digest.Compute(digest.SHA256, []byte("sha"))
	check := func(t *testing.T, ba blobstore.BlobAccess) {
		t.Helper()
		for _, d := range []digest.Digest{ds, dl} {
			got, err := blobstore.LookupHash(ctx, ba, d.Hash())
			if err != nil || got != d {
				t.Fatalf("LookupHash(%s) = %v, %v", d, got, err)
			}
		}
		if _, err := blobstore.LookupHash(ctx, ba, sha.Hash()); !blobstore.IsNotFound(err) {
			t.Fatalf("LookupHash(sha256 blob) = %v, want NotFound", err)
		}
	}
	put := func(t *testing.T, ba blobstore.BlobAccess) {
		for _, b := range []struct {
			d    digest.Digest
			data []byte
		}{{ds, small}, {dl, large}, {sha, []byte("sha")}} {
			if err := blobstore.PutBytes(ctx, ba, b.d, b.data); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Run("memory", func(t *testing.T) {
		ba := blobstore.NewMemory(blobstore.CAS, 1<<20)
		put(t, ba)
		check(t, blobstore.NewMetricsBlobAccess(ba, "lookup_test"))
		// Evict everything.
		filler := bytes.Repeat([]byte{1}, 1<<20)
		if err := blobstore.PutBytes(ctx, ba, digest.Compute(digest.SHA256, filler), filler); err != nil {
			t.Fatal(err)
		}
		if _, err := blobstore.LookupHash(ctx, ba, ds.Hash()); !blobstore.IsNotFound(err) {
			t.Fatalf("after eviction: %v, want NotFound", err)
		}
	})
	t.Run("disk", func(t *testing.T) {
		dir := t.TempDir()
		ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 64 << 20})
		put(t, ba)
		check(t, ba)
		mustClose(t, ba)
		ba = openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 64 << 20})
		check(t, ba)
		check(t, blobstore.NewTiered(blobstore.NewMemory(blobstore.CAS, 1<<20), ba))
		mustClose(t, ba)
	})
}
