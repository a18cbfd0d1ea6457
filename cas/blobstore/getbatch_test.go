package blobstore_test

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/codes"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/digest"
)

// GetBatch reads small blobs of a remote CAS with few BatchReadBlobs
// requests (one per digest function here), large ones with ByteStream,
// and reports missing and too large ones per blob; on a store that is no
// BatchGetter it reads the blobs one by one.
func TestGetBatch(t *testing.T) {
	rng := blobstoretest.Rand(t)
	hooks := &grpcHooks{}
	env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{})
	mem := blobstore.NewMemory(blobstore.CAS, 1<<30)
	var ds []digest.Digest
	var want [][]byte
	for i := range 200 {
		n := 1 + rng.IntN(2000)
		if i == 7 {
			n = 3 << 20 // ByteStream
		}
		b := blobstoretest.RandomBlob(rng, digest.Functions[i%2], n)
		for _, st := range []blobstore.BlobAccess{env.client, mem} {
			if err := blobstore.PutBytes(grpcCtx(t), st, b.Digest, b.Data); err != nil {
				t.Fatal(err)
			}
		}
		ds = append(ds, b.Digest)
		want = append(want, b.Data)
	}
	missing := blobstoretest.RandomBlob(rng, digest.SHA256, 100).Digest
	ds = append(ds, missing, digest.Empty(digest.BLAKE3))
	want = append(want, nil, []byte{})
	for _, st := range []blobstore.BlobAccess{env.client, mem} {
		hooks.reset()
		data, errs := blobstore.GetBatch(grpcCtx(t), st, ds, 64<<20)
		for i := range ds {
			if i == len(ds)-2 {
				blobstoretest.WantCode(t, errs[i], codes.NotFound, "GetBatch of a missing blob")
				continue
			}
			if errs[i] != nil || !bytes.Equal(data[i], want[i]) {
				t.Fatalf("blob %d (%s): %d bytes, %v", i, ds[i], len(data[i]), errs[i])
			}
		}
		if st == env.client {
			if n := hooks.count("BatchReadBlobs"); n != 2 {
				t.Errorf("%d BatchReadBlobs requests, want 2 (one per digest function)", n)
			}
		}
		_, errs = blobstore.GetBatch(grpcCtx(t), st, ds[:2], 10)
		blobstoretest.WantCode(t, errs[0], codes.InvalidArgument, "GetBatch of a blob larger than max")
	}
}
