package tvixbuild

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	snixbuildpb "tvixfarm/proto/snix/build/v1"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	buildpb "tvixfarm/proto/tvix/build/v1"
)

// TvixServer is tvix.build.v1.BuildService on a Service: outputs are
// named by the last component of their output path, as Tvix's OCI builder
// names them.
type TvixServer struct {
	buildpb.UnimplementedBuildServiceServer
	S *Service
}

// DoBuild runs the build.
func (t TvixServer) DoBuild(ctx context.Context, req *buildpb.BuildRequest) (*buildpb.Build, error) {
	res, err := t.S.Build(ctx, req)
	if err != nil {
		return nil, err
	}
	b := &buildpb.Build{BuildRequest: req, Outputs: res.Outputs}
	for _, n := range res.Needles {
		b.OutputsNeedles = append(b.OutputsNeedles, &buildpb.Build_OutputNeedles{Needles: n})
	}
	return b, nil
}

// SnixServer is snix.build.v1.BuildService on a Service: outputs are
// anonymous entries in request order, as Snix clients require.
type SnixServer struct {
	snixbuildpb.UnimplementedBuildServiceServer
	S *Service
}

// DoBuild runs the build.
func (s SnixServer) DoBuild(ctx context.Context, sreq *snixbuildpb.BuildRequest) (*snixbuildpb.BuildResponse, error) {
	var req buildpb.BuildRequest
	if err := convert(sreq, &req); err != nil {
		return nil, err
	}
	res, err := s.S.Build(ctx, &req)
	if err != nil {
		return nil, err
	}
	out := &snixbuildpb.BuildResponse{}
	for i, n := range res.Outputs {
		var e snixcastorepb.Entry
		if err := convert(n, &e); err != nil {
			return nil, err
		}
		switch {
		case e.GetDirectory() != nil:
			e.GetDirectory().Name = nil
		case e.GetFile() != nil:
			e.GetFile().Name = nil
		case e.GetSymlink() != nil:
			e.GetSymlink().Name = nil
		}
		out.Outputs = append(out.Outputs, &snixbuildpb.BuildResponse_Output{Output: &e, Needles: res.Needles[i]})
	}
	return out, nil
}

// convert copies a message into its wire-identical twin of the other
// family.
func convert(from, to proto.Message) error {
	b, err := proto.Marshal(from)
	if err != nil {
		return status.Errorf(codes.Internal, "encoding %T: %v", from, err)
	}
	if err := proto.Unmarshal(b, to); err != nil {
		return status.Errorf(codes.InvalidArgument, "decoding as %T: %v", to, err)
	}
	return nil
}
