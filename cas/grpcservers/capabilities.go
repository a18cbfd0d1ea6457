// Package grpcservers implements the REAPI storage services (Capabilities,
// ContentAddressableStorage, ByteStream, ActionCache) on top of
// blobstore.BlobAccess. Requests are validated here, at the edge: digests and
// resource names are parsed into digest.Digest values before any store sees
// them.
package grpcservers

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	semver "github.com/bazelbuild/remote-apis/build/bazel/semver"

	"tvixfarm/cas/digest"
)

// MaxBatchTotalSize is the max_batch_total_size_bytes announced to clients
// and enforced on BatchUpdateBlobs and BatchReadBlobs.
const MaxBatchTotalSize = 4 << 20

// MaxRecvMsgSize is the gRPC receive limit servers must allow so that a full
// batch plus its framing fits.
const MaxRecvMsgSize = 16 << 20

// CapabilitiesServer answers GetCapabilities.
type CapabilitiesServer struct {
	repb.UnimplementedCapabilitiesServer
	// Execution, when set, announces remote execution (the scheduler role).
	Execution *repb.ExecutionCapabilities
}

// GetCapabilities announces the storage capabilities: SHA-256 and BLAKE3,
// zstd, 4 MiB batches, action cache updates, API 2.0 to 2.11.
func (s *CapabilitiesServer) GetCapabilities(ctx context.Context, req *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	fns := make([]repb.DigestFunction_Value, len(digest.Functions))
	for i, f := range digest.Functions {
		fns[i] = f.Proto()
	}
	return &repb.ServerCapabilities{
		CacheCapabilities: &repb.CacheCapabilities{
			DigestFunctions:                 fns,
			ActionCacheUpdateCapabilities:   &repb.ActionCacheUpdateCapabilities{UpdateEnabled: true},
			MaxBatchTotalSizeBytes:          MaxBatchTotalSize,
			SymlinkAbsolutePathStrategy:     repb.SymlinkAbsolutePathStrategy_ALLOWED,
			SupportedCompressors:            []repb.Compressor_Value{repb.Compressor_ZSTD},
			SupportedBatchUpdateCompressors: []repb.Compressor_Value{repb.Compressor_ZSTD},
		},
		ExecutionCapabilities: s.Execution,
		LowApiVersion:         &semver.SemVer{Major: 2, Minor: 0},
		HighApiVersion:        &semver.SemVer{Major: 2, Minor: 11},
	}, nil
}
