package blobstore_test

import (
	"context"
	"io"
	"testing"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// TestWithEmptyBlob: the empty blob is present and readable without being
// stored; other blobs are the wrapped store's.
func TestWithEmptyBlob(t *testing.T) {
	ctx := context.Background()
	inner := blobstore.NewMemory(blobstore.CAS, 1<<20)
	ba := blobstore.WithEmptyBlob(inner)
	for _, fn := range digest.Functions {
		empty := digest.Empty(fn)
		data := []byte("hello")
		d := digest.Compute(fn, data)
		missing, err := ba.FindMissing(ctx, []digest.Digest{empty, d})
		if err != nil || len(missing) != 1 || missing[0] != d {
			t.Fatalf("%s: FindMissing = %v, %v; want only %s", fn, missing, err, d)
		}
		rc, err := ba.Get(ctx, empty)
		if err != nil {
			t.Fatalf("%s: Get of the empty blob: %v", fn, err)
		}
		if got, err := io.ReadAll(rc); err != nil || len(got) != 0 {
			t.Fatalf("%s: empty blob read %q, %v", fn, got, err)
		}
		rc.Close()
		for _, err := range blobstore.PutBatch(ctx, ba, []blobstore.Blob{{Digest: d, Data: data}}) {
			if err != nil {
				t.Fatalf("%s: PutBatch: %v", fn, err)
			}
		}
		if got, err := blobstore.GetBytes(ctx, inner, d, 100); err != nil || string(got) != "hello" {
			t.Fatalf("%s: the wrapped store has %q, %v", fn, got, err)
		}
		if missing, err := ba.FindMissing(ctx, []digest.Digest{d}); err != nil || len(missing) != 0 {
			t.Fatalf("%s: FindMissing after the put = %v, %v", fn, missing, err)
		}
	}
}
