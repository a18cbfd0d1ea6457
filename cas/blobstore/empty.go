package blobstore

import (
	"context"
	"io"

	"tvixfarm/cas/digest"
)

// WithEmptyBlob returns a CAS BlobAccess that treats the empty blob as
// REAPI does: always present, whether or not ba stores it. The CAS server
// and the gRPC client (NewGRPC) do the same, so that a program using a
// farm's store in-process, rather than over gRPC, sees what a client of the
// farm sees: executors, for one, never upload empty outputs. Batch puts
// (BatchPutter) go to ba's own.
func WithEmptyBlob(ba BlobAccess) BlobAccess { return emptyBlob{ba} }

type emptyBlob struct{ BlobAccess }

func (e emptyBlob) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if isEmptyBlob(d) {
		return newBytesReadCloser(nil), nil
	}
	return e.BlobAccess.Get(ctx, d)
}

func (e emptyBlob) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	missing, err := e.BlobAccess.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	n := 0
	for _, d := range missing {
		if !isEmptyBlob(d) {
			missing[n] = d
			n++
		}
	}
	return missing[:n], nil
}

func (e emptyBlob) PutBatch(ctx context.Context, blobs []Blob) []error {
	return PutBatch(ctx, e.BlobAccess, blobs)
}
