package grpcservers

import (
	"context"
	"encoding/binary"
	"slices"
	"strconv"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// maxFindMissing bounds the digests of one FindMissingBlobs request.
const maxFindMissing = 100_000

// CASServer implements ContentAddressableStorage.
type CASServer struct {
	repb.UnimplementedContentAddressableStorageServer
	stores *blobstore.Instances
}

// NewCASServer returns a ContentAddressableStorage server over stores.
func NewCASServer(stores *blobstore.Instances) *CASServer {
	return &CASServer{stores: stores}
}

var (
	zstdEncoder, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	zstdDecoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxRecvMsgSize))
)

// RequestFunction validates a request's instance name and resolves its
// digest function (REAPI 2.3: absent means the one the hash length
// implies, which is SHA-256 for the functions tvixfarm supports). The
// scheduler uses it too.
func RequestFunction(instance string, v repb.DigestFunction_Value) (digest.Function, error) {
	if err := digest.ValidateInstanceName(instance); err != nil {
		return 0, err
	}
	return digest.FunctionFromProto(v)
}

func parseDigests(fn digest.Function, pds []*repb.Digest) ([]digest.Digest, error) {
	ds := make([]digest.Digest, len(pds))
	for i, pd := range pds {
		d, err := digest.FromProto(fn, pd)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "digest %d: %s", i, status.Convert(err).Message())
		}
		ds[i] = d
	}
	return ds, nil
}

// FindMissingBlobs reports the blobs the store lacks. The empty blob is
// never missing.
func (s *CASServer) FindMissingBlobs(ctx context.Context, req *repb.FindMissingBlobsRequest) (*repb.FindMissingBlobsResponse, error) {
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	if len(req.BlobDigests) > maxFindMissing {
		return nil, status.Errorf(codes.InvalidArgument, "%d digests in one request; at most %d are allowed", len(req.BlobDigests), maxFindMissing)
	}
	all, err := parseDigests(fn, req.BlobDigests)
	if err != nil {
		return nil, err
	}
	ds := withoutEmpty(all)
	missing, err := s.stores.For(req.InstanceName).CAS.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	dups := hasDuplicates(missing)
	// Stores return the missing digests in request order, so the request's
	// own messages can be returned rather than re-encoded.
	resp := &repb.FindMissingBlobsResponse{MissingBlobDigests: make([]*repb.Digest, 0, len(missing))}
	var seen map[digest.Digest]bool
	if dups {
		seen = make(map[digest.Digest]bool, len(missing))
	}
	j := 0
	for i, d := range all {
		if j == len(missing) {
			break
		}
		if d != missing[j] {
			continue
		}
		j++
		if dups {
			if seen[d] {
				continue
			}
			seen[d] = true
		}
		resp.MissingBlobDigests = append(resp.MissingBlobDigests, req.BlobDigests[i])
	}
	return resp, nil
}

// hasDuplicates reports whether ds holds a digest twice. Requests rarely
// do, and checking costs far less than a set of all digests: compare the
// first 8 hash bytes in a sorted copy.
func hasDuplicates(ds []digest.Digest) bool {
	if len(ds) < 2 {
		return false
	}
	keys := make([]uint64, len(ds))
	for i, d := range ds {
		h := d.Hash()
		keys[i] = binary.LittleEndian.Uint64(h[:8])
	}
	slices.Sort(keys)
	for i := 1; i < len(keys); i++ {
		if keys[i] == keys[i-1] {
			return true // possibly; the caller then deduplicates exactly
		}
	}
	return false
}

func withoutEmpty(ds []digest.Digest) []digest.Digest {
	out := ds[:0:0]
	for _, d := range ds {
		// Only the empty blob itself: a size-0 digest with another hash
		// names a blob that cannot exist, so it is missing.
		if d != digest.Empty(d.Function()) {
			out = append(out, d)
		}
	}
	return out
}

// BatchUpdateBlobs stores small blobs, in parallel, each verified against
// its digest; the response has one status per blob.
func (s *CASServer) BatchUpdateBlobs(ctx context.Context, req *repb.BatchUpdateBlobsRequest) (*repb.BatchUpdateBlobsResponse, error) {
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, r := range req.Requests {
		total += int64(len(r.Data))
	}
	if total > MaxBatchTotalSize {
		return nil, status.Errorf(codes.InvalidArgument, "batch carries %d bytes, more than max_batch_total_size_bytes (%d); use ByteStream for large blobs", total, MaxBatchTotalSize)
	}
	cas := s.stores.For(req.InstanceName).CAS
	resp := &repb.BatchUpdateBlobsResponse{Responses: make([]*repb.BatchUpdateBlobsResponse_Response, len(req.Requests))}
	// Parse and decompress each blob, then store the valid ones together.
	blobs := make([]blobstore.Blob, len(req.Requests))
	errs := make([]error, len(req.Requests))
	blobstore.ParallelFor(len(req.Requests), func(i int) {
		r := req.Requests[i]
		d, err := digest.FromProto(fn, r.Digest)
		if err == nil {
			blobs[i].Digest = d
			blobs[i].Data, err = decodeBlob(d, r.Compressor, r.Data)
		}
		errs[i] = err
	})
	var todo []blobstore.Blob
	var where []int
	for i, b := range blobs {
		if errs[i] == nil && b.Digest.Size() > 0 {
			todo = append(todo, b)
			where = append(where, i)
		}
	}
	for k, err := range blobstore.PutBatch(ctx, cas, todo) {
		errs[where[k]] = err
	}
	for i, r := range req.Requests {
		resp.Responses[i] = &repb.BatchUpdateBlobsResponse_Response{Digest: r.Digest, Status: statusProto(errs[i])}
	}
	return resp, nil
}

// decodeBlob decompresses a batch upload and checks its size; the empty
// blob is verified here, since it is never stored.
func decodeBlob(d digest.Digest, c repb.Compressor_Value, data []byte) ([]byte, error) {
	switch c {
	case repb.Compressor_IDENTITY:
	case repb.Compressor_ZSTD:
		if d.Size() > MaxBatchTotalSize {
			return nil, status.Errorf(codes.InvalidArgument, "blob %s is larger than max_batch_total_size_bytes once decompressed", d)
		}
		var err error
		data, err = zstdDecoder.DecodeAll(data, make([]byte, 0, d.Size()))
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "blob %s: invalid zstd data: %v", d, err)
		}
	default:
		return nil, status.Errorf(codes.InvalidArgument, "blob %s: compressor %s is not supported", d, c)
	}
	if int64(len(data)) != d.Size() {
		// Name the actual digest, as Verify does for equal sizes.
		return nil, digest.MismatchError(d, digest.Compute(d.Function(), data))
	}
	if d.Size() == 0 {
		return data, d.Verify(data)
	}
	return data, nil
}

// BatchReadBlobs returns small blobs, compressed with zstd when the client
// accepts it and it pays off.
func (s *CASServer) BatchReadBlobs(ctx context.Context, req *repb.BatchReadBlobsRequest) (*repb.BatchReadBlobsResponse, error) {
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, pd := range req.Digests {
		// A (malformed) negative size must not offset the others.
		total += max(pd.GetSizeBytes(), 0)
	}
	if total > MaxBatchTotalSize {
		return nil, status.Errorf(codes.InvalidArgument, "batch asks for %d bytes, more than max_batch_total_size_bytes (%d); use ByteStream for large blobs", total, MaxBatchTotalSize)
	}
	zstdOK := false
	for _, c := range req.AcceptableCompressors {
		zstdOK = zstdOK || c == repb.Compressor_ZSTD
	}
	cas := s.stores.For(req.InstanceName).CAS
	resp := &repb.BatchReadBlobsResponse{Responses: make([]*repb.BatchReadBlobsResponse_Response, len(req.Digests))}
	blobstore.ParallelFor(len(req.Digests), func(i int) {
		pd := req.Digests[i]
		out := &repb.BatchReadBlobsResponse_Response{Digest: pd}
		resp.Responses[i] = out
		d, err := digest.FromProto(fn, pd)
		if err != nil {
			out.Status = statusProto(err)
			return
		}
		data, err := readSmall(ctx, cas, d)
		if err != nil {
			out.Status = statusProto(err)
			return
		}
		out.Data = data
		if zstdOK && len(data) >= 512 {
			if z := zstdEncoder.EncodeAll(data, nil); len(z) < len(data) {
				out.Data, out.Compressor = z, repb.Compressor_ZSTD
			}
		}
		out.Status = &spb.Status{}
	})
	return resp, nil
}

// readSmall reads a blob that fits in a batch; the empty blob is always
// present.
func readSmall(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest) ([]byte, error) {
	if d.Size() == 0 {
		if d != digest.Empty(d.Function()) {
			return nil, blobstore.NotFound(blobstore.CAS, d)
		}
		return []byte{}, nil
	}
	return blobstore.GetBytes(ctx, cas, d, MaxBatchTotalSize)
}

// maxTreePageBytes bounds the encoded size of one GetTreeResponse, so that
// pages fit gRPC's default 4 MiB receive limit.
const maxTreePageBytes = 4<<20 - 1<<10

// GetTree streams the Directory tree under a root, breadth first, in pages
// of at most page_size directories and maxTreePageBytes bytes. Every page
// but the last carries a page token, the position of the next page's first
// directory in that order; a request with a token streams the tree from
// there. Directories missing from the CAS are omitted, as REAPI allows; a
// missing root is NotFound.
func (s *CASServer) GetTree(req *repb.GetTreeRequest, stream repb.ContentAddressableStorage_GetTreeServer) error {
	ctx := stream.Context()
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return err
	}
	root, err := digest.FromProto(fn, req.RootDigest)
	if err != nil {
		return err
	}
	start := 0
	if req.PageToken != "" {
		start, err = strconv.Atoi(req.PageToken)
		if err != nil || start < 0 {
			return status.Errorf(codes.InvalidArgument, "invalid page token %q", req.PageToken)
		}
	}
	pageSize := int(req.PageSize)
	if pageSize <= 0 || pageSize > 10_000 {
		pageSize = 10_000
	}
	cas := s.stores.For(req.InstanceName).CAS
	queue := []digest.Digest{root}
	seen := map[digest.Digest]bool{root: true}
	var page []*repb.Directory
	pageBytes := 0
	// flush sends the page; next is the position that follows it.
	flush := func(next int) error {
		err := stream.Send(&repb.GetTreeResponse{Directories: page, NextPageToken: strconv.Itoa(next)})
		page, pageBytes = nil, 0
		return err
	}
	for i := 0; i < len(queue); i++ {
		if i >= start && len(page) == pageSize {
			if err := flush(i); err != nil {
				return err
			}
		}
		data, err := readSmall(ctx, cas, queue[i])
		if blobstore.IsNotFound(err) {
			if i == 0 {
				return status.Errorf(codes.NotFound, "root directory %s is not in the CAS", root)
			}
			continue
		} else if err != nil {
			return err
		}
		dir := &repb.Directory{}
		if err := proto.Unmarshal(data, dir); err != nil {
			return status.Errorf(codes.InvalidArgument, "directory %s is not a valid Directory message: %v", queue[i], err)
		}
		for _, sub := range dir.Directories {
			sd, err := digest.FromProto(fn, sub.Digest)
			if err != nil {
				return status.Errorf(codes.InvalidArgument, "directory %s, entry %q: %s", queue[i], sub.Name, status.Convert(err).Message())
			}
			if !seen[sd] {
				seen[sd] = true
				queue = append(queue, sd)
			}
		}
		if i >= start {
			size := protowire.SizeTag(1) + protowire.SizeBytes(len(data))
			if len(page) > 0 && pageBytes+size > maxTreePageBytes {
				if err := flush(i); err != nil {
					return err
				}
			}
			page = append(page, dir)
			pageBytes += size
		}
	}
	return stream.Send(&repb.GetTreeResponse{Directories: page})
}

// statusProto converts an error into a google.rpc.Status; nil is OK.
func statusProto(err error) *spb.Status {
	if err == nil {
		return &spb.Status{}
	}
	return status.Convert(err).Proto()
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, readChunkSize); return &b }}
