package blobstore

import (
	"bytes"
	"context"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
)

// NewGRPCActionCache returns an action cache (Kind AC) that is a client of
// a REAPI ActionCache service: values are serialized ActionResults, read
// with GetActionResult and written with UpdateActionResult. A scheduler
// without the storage role uses it for its cache lookups and writes.
func NewGRPCActionCache(conn grpc.ClientConnInterface, instance string, opts GRPCOptions) BlobAccess {
	return &grpcAC{ac: repb.NewActionCacheClient(conn), instance: instance, opts: opts.withDefaults(instance)}
}

type grpcAC struct {
	ac       repb.ActionCacheClient
	instance string
	opts     GRPCOptions
}

func (g *grpcAC) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	ctx, cancel := context.WithTimeout(ctx, g.opts.Timeout)
	defer cancel()
	res, err := g.ac.GetActionResult(ctx, &repb.GetActionResultRequest{
		InstanceName: g.instance, ActionDigest: d.Proto(), DigestFunction: d.Function().Proto()})
	if err != nil {
		return nil, err // NOT_FOUND stays NOT_FOUND
	}
	data, err := proto.Marshal(res)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "action cache: %v", err)
	}
	return io.NopCloser(bytes.NewReader(data)), nil
}

func (g *grpcAC) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	data, err := io.ReadAll(io.LimitReader(r, MaxACEntrySize+1))
	if err != nil {
		return err
	}
	if len(data) > MaxACEntrySize {
		return status.Errorf(codes.InvalidArgument, "action result of %s is larger than %d bytes", d, MaxACEntrySize)
	}
	var res repb.ActionResult
	if err := proto.Unmarshal(data, &res); err != nil {
		return status.Errorf(codes.InvalidArgument, "action result of %s: %v", d, err)
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.Timeout)
	defer cancel()
	_, err = g.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{
		InstanceName: g.instance, ActionDigest: d.Proto(), ActionResult: &res, DigestFunction: d.Function().Proto()})
	return err
}

// FindMissing is not part of the ActionCache service.
func (g *grpcAC) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	return nil, fmt.Errorf("action cache client: FindMissing: %w", status.Error(codes.Unimplemented, "not supported"))
}
