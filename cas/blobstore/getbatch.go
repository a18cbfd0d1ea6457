package blobstore

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// BatchGetter is implemented by backends that read many small blobs in
// one round trip (a remote CAS: BatchReadBlobs).
type BatchGetter interface {
	// GetBatch reads the blobs ds, each whole, and returns their data and
	// errors (NotFound for a missing one), in the order of ds.
	GetBatch(ctx context.Context, ds []digest.Digest) ([][]byte, []error)
}

// GetBatch reads the blobs ds from ba, each of at most max bytes: in one
// round trip from a BatchGetter, else with GetBytes on up to Parallelism
// goroutines. The empty blob is always there, as REAPI specifies. The
// data may be the store's own copies: callers must not modify them.
func GetBatch(ctx context.Context, ba BlobAccess, ds []digest.Digest, max int64) ([][]byte, []error) {
	data := make([][]byte, len(ds))
	errs := make([]error, len(ds))
	bg, ok := ba.(BatchGetter)
	if !ok {
		ParallelFor(len(ds), func(i int) {
			if isEmptyBlob(ds[i]) {
				data[i] = []byte{}
				return
			}
			data[i], errs[i] = GetBytes(ctx, ba, ds[i], max)
		})
		return data, errs
	}
	var small []digest.Digest
	var idx []int
	for i, d := range ds {
		if isEmptyBlob(d) {
			data[i] = []byte{}
			continue
		}
		if d.Size() > max {
			errs[i] = status.Errorf(codes.InvalidArgument, "blob %s is larger than %d bytes", d, max)
			continue
		}
		small = append(small, d)
		idx = append(idx, i)
	}
	got, gerrs := bg.GetBatch(ctx, small)
	for j, i := range idx {
		data[i], errs[i] = got[j], gerrs[j]
	}
	return data, errs
}

// GetBatch implements BatchGetter: blobs that fit BatchReadBlobs are read
// in as few requests as fit the server's batch size, each retried as a
// whole on retriable errors and every blob verified; the others are read
// with Get.
func (s *grpcStore) GetBatch(ctx context.Context, ds []digest.Digest) ([][]byte, []error) {
	data := make([][]byte, len(ds))
	errs := make([]error, len(ds))
	// A request per digest function and batch size.
	byFn := make(map[digest.Function][]int)
	var fns []digest.Function
	for i, d := range ds {
		switch {
		case isEmptyBlob(d):
			data[i] = []byte{}
		case d.Size() >= s.opts.BatchReadBelow:
			data[i], errs[i] = GetBytes(ctx, s, d, d.Size())
		default:
			if byFn[d.Function()] == nil {
				fns = append(fns, d.Function())
			}
			byFn[d.Function()] = append(byFn[d.Function()], i)
		}
	}
	for _, fn := range fns {
		var part []int // indexes of ds in the request being built
		var size int64
		for _, i := range byFn[fn] {
			if n := ds[i].Size() + batchBlobOverhead; len(part) > 0 && size+n > s.batchCapacity() {
				s.batchReadMany(ctx, ds, part, data, errs)
				part, size = part[:0], 0
			}
			part = append(part, i)
			size += ds[i].Size() + batchBlobOverhead
		}
		if len(part) > 0 {
			s.batchReadMany(ctx, ds, part, data, errs)
		}
	}
	return data, errs
}

// batchReadMany reads the blobs ds[i] for i in part with one
// BatchReadBlobs request, into data and errs.
func (s *grpcStore) batchReadMany(ctx context.Context, ds []digest.Digest, part []int, data [][]byte, errs []error) {
	req := &repb.BatchReadBlobsRequest{InstanceName: s.instance, DigestFunction: ds[part[0]].Function().Proto()}
	for _, i := range part {
		req.Digests = append(req.Digests, ds[i].Proto())
	}
	var resp *repb.BatchReadBlobsResponse
	err := s.retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
		defer cancel()
		var err error
		resp, err = s.cas.BatchReadBlobs(ctx, req, grpc.MaxCallRecvMsgSize(int(s.opts.MaxBatchTotalSize)+1<<20))
		return err
	})
	type key struct {
		hash string
		size int64
	}
	byKey := make(map[key]*repb.BatchReadBlobsResponse_Response, len(part))
	if err == nil {
		for _, r := range resp.Responses {
			byKey[key{r.GetDigest().GetHash(), r.GetDigest().GetSizeBytes()}] = r
		}
	}
	for _, i := range part {
		d := ds[i]
		if err != nil {
			errs[i] = withContext(err, "grpc cas: BatchReadBlobs %s", d)
			continue
		}
		r := byKey[key{d.Hex(), d.Size()}]
		switch {
		case r == nil:
			errs[i] = status.Errorf(codes.Internal, "grpc cas: BatchReadBlobs %s: the server's response has no status for the blob", d)
		case r.Status.GetCode() != int32(codes.OK):
			errs[i] = withContext(status.ErrorProto(r.Status), "grpc cas: BatchReadBlobs %s", d)
		case r.Compressor != repb.Compressor_IDENTITY:
			errs[i] = status.Errorf(codes.Internal, "grpc cas: BatchReadBlobs %s: the server sent compressor %s, which was not asked for", d, r.Compressor)
		default:
			if verr := d.Verify(r.Data); verr != nil {
				errs[i] = status.Errorf(codes.DataLoss, "grpc cas: BatchReadBlobs %s: the server sent corrupt data: %s", d, status.Convert(verr).Message())
				continue
			}
			data[i] = r.Data
		}
	}
}
