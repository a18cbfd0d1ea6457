package grpcservers

import (
	"context"
	"log/slog"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// maxInline bounds the bytes GetActionResult inlines into one response.
const maxInline = 1 << 20

// ActionCacheServer implements ActionCache. A stored result whose blobs are
// not all in the CAS is reported as a miss (completeness checking), so a
// client never receives a result it cannot download.
type ActionCacheServer struct {
	repb.UnimplementedActionCacheServer
	stores *blobstore.Instances
}

// NewActionCacheServer returns an ActionCache server over stores.
func NewActionCacheServer(stores *blobstore.Instances) *ActionCacheServer {
	return &ActionCacheServer{stores: stores}
}

// GetActionResult returns the cached result of an action, with the
// requested outputs inlined.
func (s *ActionCacheServer) GetActionResult(ctx context.Context, req *repb.GetActionResultRequest) (*repb.ActionResult, error) {
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	ad, err := digest.FromProto(fn, req.ActionDigest)
	if err != nil {
		return nil, err
	}
	st := s.stores.For(req.InstanceName)
	res, err := GetActionResult(ctx, st, ad)
	if err != nil {
		return nil, err
	}
	if err := inline(ctx, st.CAS, fn, res, req); err != nil {
		return nil, err
	}
	return res, nil
}

// GetActionResult reads the result of action ad from st.AC and checks that
// every blob it references is in st.CAS; if one is not, the result is a
// miss (NotFound). The scheduler uses it for its cache lookups too.
func GetActionResult(ctx context.Context, st blobstore.Stores, ad digest.Digest) (*repb.ActionResult, error) {
	data, err := blobstore.GetBytes(ctx, st.AC, ad, blobstore.MaxACEntrySize)
	if err != nil {
		return nil, err
	}
	res := &repb.ActionResult{}
	if err := proto.Unmarshal(data, res); err != nil {
		slog.Warn("action cache: unreadable entry treated as a miss", "action", ad.Sprint(), "err", err)
		return nil, status.Errorf(codes.NotFound, "action result for %s is unreadable", ad)
	}
	if err := checkComplete(ctx, st.CAS, ad.Function(), res); err != nil {
		return nil, err
	}
	return res, nil
}

// referenced returns the digests of the blobs res refers to directly.
func referenced(fn digest.Function, res *repb.ActionResult) ([]digest.Digest, []digest.Digest, error) {
	var blobs, trees []digest.Digest
	add := func(pd *repb.Digest, what string, list *[]digest.Digest) error {
		if pd == nil {
			return nil
		}
		d, err := digest.FromProto(fn, pd)
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "%s: %s", what, status.Convert(err).Message())
		}
		*list = append(*list, d)
		return nil
	}
	if err := add(res.StdoutDigest, "stdout_digest", &blobs); err != nil {
		return nil, nil, err
	}
	if err := add(res.StderrDigest, "stderr_digest", &blobs); err != nil {
		return nil, nil, err
	}
	for _, f := range res.OutputFiles {
		if f.Digest == nil {
			return nil, nil, status.Errorf(codes.InvalidArgument, "output file %q has no digest", f.Path)
		}
		if err := add(f.Digest, "output file "+f.Path, &blobs); err != nil {
			return nil, nil, err
		}
	}
	for _, d := range res.OutputDirectories {
		if d.TreeDigest == nil {
			return nil, nil, status.Errorf(codes.InvalidArgument, "output directory %q has no tree_digest", d.Path)
		}
		if err := add(d.TreeDigest, "output directory "+d.Path, &trees); err != nil {
			return nil, nil, err
		}
	}
	return blobs, trees, nil
}

// checkComplete reports NotFound unless all blobs res references, including
// the files inside its output directory trees, are in cas.
func checkComplete(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, res *repb.ActionResult) error {
	blobs, trees, err := referenced(fn, res)
	if err != nil {
		return status.Errorf(codes.NotFound, "stored action result is invalid: %s", status.Convert(err).Message())
	}
	for _, td := range trees {
		data, err := readSmallOrLarge(ctx, cas, td)
		if blobstore.IsNotFound(err) {
			return status.Errorf(codes.NotFound, "action result references missing tree %s", td)
		} else if err != nil {
			return err
		}
		tree := &repb.Tree{}
		if err := proto.Unmarshal(data, tree); err != nil {
			return status.Errorf(codes.NotFound, "action result references invalid tree %s", td)
		}
		for _, dir := range append([]*repb.Directory{tree.Root}, tree.Children...) {
			for _, f := range dir.GetFiles() {
				d, err := digest.FromProto(fn, f.Digest)
				if err != nil {
					return status.Errorf(codes.NotFound, "tree %s has an invalid file digest", td)
				}
				blobs = append(blobs, d)
			}
		}
		blobs = append(blobs, td)
	}
	missing, err := cas.FindMissing(ctx, withoutEmpty(blobs))
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return status.Errorf(codes.NotFound, "action result references %d missing blob(s), e.g. %s", len(missing), missing[0])
	}
	return nil
}

// readSmallOrLarge reads a tree blob, which can exceed a batch.
func readSmallOrLarge(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest) ([]byte, error) {
	return blobstore.GetBytes(ctx, cas, d, 256<<20)
}

func inline(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, res *repb.ActionResult, req *repb.GetActionResultRequest) error {
	budget := int64(maxInline)
	get := func(pd *repb.Digest) []byte {
		d, err := digest.FromProto(fn, pd)
		if err != nil || d.Size() > budget {
			return nil
		}
		data, err := readSmall(ctx, cas, d)
		if err != nil {
			return nil
		}
		budget -= d.Size()
		return data
	}
	if req.InlineStdout && res.StdoutDigest != nil && len(res.StdoutRaw) == 0 {
		res.StdoutRaw = get(res.StdoutDigest)
	}
	if req.InlineStderr && res.StderrDigest != nil && len(res.StderrRaw) == 0 {
		res.StderrRaw = get(res.StderrDigest)
	}
	want := make(map[string]bool, len(req.InlineOutputFiles))
	for _, p := range req.InlineOutputFiles {
		want[p] = true
	}
	for _, f := range res.OutputFiles {
		if want[f.Path] && len(f.Contents) == 0 {
			f.Contents = get(f.Digest)
		}
	}
	return nil
}

// UpdateActionResult stores a result after checking that its digests are
// well formed.
func (s *ActionCacheServer) UpdateActionResult(ctx context.Context, req *repb.UpdateActionResultRequest) (*repb.ActionResult, error) {
	fn, err := RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return nil, err
	}
	ad, err := digest.FromProto(fn, req.ActionDigest)
	if err != nil {
		return nil, err
	}
	if req.ActionResult == nil {
		return nil, status.Error(codes.InvalidArgument, "action_result is missing")
	}
	if _, _, err := referenced(fn, req.ActionResult); err != nil {
		return nil, err
	}
	if err := PutActionResult(ctx, s.stores.For(req.InstanceName), ad, req.ActionResult); err != nil {
		return nil, err
	}
	return req.ActionResult, nil
}

// PutActionResult stores res as the result of action ad.
func PutActionResult(ctx context.Context, st blobstore.Stores, ad digest.Digest, res *repb.ActionResult) error {
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(res)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "marshal action result: %v", err)
	}
	return blobstore.PutBytes(ctx, st.AC, ad, data)
}
