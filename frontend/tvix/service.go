// Package tvix is the farm's Tvix/Snix store front door: the PathInfoService
// of tvix.store.v1 and snix.store.v1 over the farm's path-info store
// (frontend/pathinfo), with the castore BlobService and DirectoryService
// (cas/castore) on the same CAS.
//
// A farm path info keeps its tree as a REAPI node (what builds use) and, when
// a Tvix client put it, the castore node the client sent. Get answers with
// that castore node, or with one mapped from the REAPI tree
// (castore.Store.FromREAPI), so paths built by `tvixfarm build` are visible
// to Tvix clients; Put maps the client's castore tree to a REAPI tree
// (castore.Store.ToREAPI), so those paths can be inputs of farm builds.
// NARs (CalculateNAR, and the hash check of Put) are rendered by
// frontend/nar from the REAPI tree, bit-identical to Nix's.
package tvix

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	snixstorepb "tvixfarm/proto/snix/store/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
	tvixstorepb "tvixfarm/proto/tvix/store/v1"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Service implements PathInfoService on the farm's stores.
type Service struct {
	tvixstorepb.UnimplementedPathInfoServiceServer
	paths pathinfo.Store
	st    *castore.Store
	ac    blobstore.BlobAccess
	now   func() time.Time
}

// NewService returns the PathInfoService of paths, whose trees are in
// st's CAS. ac (action-cache kind) caches NAR hashes of castore nodes.
func NewService(paths pathinfo.Store, st *castore.Store, ac blobstore.BlobAccess) *Service {
	return &Service{paths: paths, st: st, ac: ac, now: time.Now}
}

// Register serves castore (BlobService, DirectoryService) and
// PathInfoService on s, each under its tvix.*.v1 and snix.*.v1 names.
func Register(s grpc.ServiceRegistrar, paths pathinfo.Store, st *castore.Store, ac blobstore.BlobAccess) {
	castore.Register(s, st)
	svc := NewService(paths, st, ac)
	tvixstorepb.RegisterPathInfoServiceServer(s, svc)
	castore.RegisterAs(s, &tvixstorepb.PathInfoService_ServiceDesc, &snixstorepb.PathInfoService_ServiceDesc, svc)
}

// Get returns the path info whose 20-byte store path digest is
// by_output_hash, or NotFound.
func (s *Service) Get(ctx context.Context, req *tvixstorepb.GetPathInfoRequest) (*tvixstorepb.PathInfo, error) {
	if req.GetByWhat() == nil {
		return nil, status.Error(codes.InvalidArgument, "pathinfo: by_what is not set")
	}
	h := req.GetByOutputHash()
	if len(h) != 20 {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: invalid digest length %d, want 20", len(h))
	}
	info, err := s.paths.GetByHash(ctx, nixbase32.EncodeToString(h))
	if err != nil {
		return nil, err
	}
	return s.ToTvix(ctx, info)
}

// Put validates info, checks that its tree is stored and renders to the
// NAR hash and size it claims, maps it to a REAPI tree and stores it in
// the farm's path-info store. It returns what Get will return.
func (s *Service) Put(ctx context.Context, in *tvixstorepb.PathInfo) (*tvixstorepb.PathInfo, error) {
	if err := Validate(in); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: %v", err)
	}
	info, nn, err := s.fromTvix(ctx, in)
	if err != nil {
		return nil, err
	}
	got, err := s.calculate(ctx, info.Castore, &nn)
	if err != nil {
		return nil, err
	}
	if got.NarSize != info.NarSize || string(got.NarSha256) != string(info.NarSha256) {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: %s: the tree's NAR is sha256:%s, %d bytes, not sha256:%s, %d bytes as the path info says",
			info.StorePath, nixbase32.EncodeToString(got.NarSha256), got.NarSize, nixbase32.EncodeToString(info.NarSha256), info.NarSize)
	}
	info.RegistrationTime = s.now().Unix()
	if err := s.paths.Put(ctx, []*storepb.PathInfo{info}); err != nil {
		return nil, err
	}
	return s.ToTvix(ctx, info)
}

// CalculateNAR returns the NAR size and SHA-256 of an anonymous node's
// tree. A tree that is not completely stored is FailedPrecondition.
func (s *Service) CalculateNAR(ctx context.Context, n *castorepb.Node) (*tvixstorepb.CalculateNARResponse, error) {
	if err := castore.ValidateNode(n, true); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: invalid root node: %v", err)
	}
	nn, err := s.narNode(ctx, n)
	if errors.Is(err, castore.ErrNotUTF8) {
		return s.calculate(ctx, n, nil) // rendered from the castore tree
	}
	if err != nil {
		return nil, err
	}
	return s.calculate(ctx, n, &nn)
}

// calculate renders the NAR of nn (the REAPI form of the castore node n;
// nil to render n's castore tree itself), cached in the action-cache store by n's encoding.
func (s *Service) calculate(ctx context.Context, n *castorepb.Node, nn *nar.Node) (*tvixstorepb.CalculateNARResponse, error) {
	enc, err := proto.MarshalOptions{Deterministic: true}.Marshal(n)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "pathinfo: %v", err)
	}
	sum := sha256.Sum256(append([]byte("tvixfarm.tvix.v1.CalculateNAR\x00"), enc...))
	k := digest.New(digest.SHA256, sum, 0)
	if data, err := blobstore.GetBytes(ctx, s.ac, k, 1024); err == nil {
		var r tvixstorepb.CalculateNARResponse
		if proto.Unmarshal(data, &r) == nil && len(r.NarSha256) == 32 {
			return &r, nil
		}
	}
	var pi nar.PathInfo
	if nn != nil {
		pi, err = nar.Info(ctx, s.st.CAS(), digest.BLAKE3, *nn, nil)
	} else {
		h := &narHasher{h: sha256.New()}
		if err = s.writeCastoreNAR(ctx, n, h); err == nil {
			pi.NarSize = h.n
			copy(pi.NarHash[:], h.h.Sum(nil))
		}
	}
	if err != nil {
		if c := status.Code(err); c == codes.NotFound || c == codes.Unknown {
			return nil, status.Errorf(codes.FailedPrecondition, "pathinfo: rendering the NAR: %v (upload blobs and directories first)", err)
		}
		return nil, fmt.Errorf("pathinfo: rendering the NAR: %w", err)
	}
	r := &tvixstorepb.CalculateNARResponse{NarSize: pi.NarSize, NarSha256: pi.NarHash[:]}
	if data, err := proto.Marshal(r); err == nil {
		_ = blobstore.PutBytes(ctx, s.ac, k, data)
	}
	return r, nil
}

// List streams every path info of a store that can be enumerated
// (pathinfo.Lister: the farm's store is, through its index, for the paths
// put through this process); others answer UNIMPLEMENTED. Tvix clients use
// List for listing a FUSE mount's root.
func (s *Service) List(_ *tvixstorepb.ListPathInfoRequest, stream grpc.ServerStreamingServer[tvixstorepb.PathInfo]) error {
	l, ok := s.paths.(pathinfo.Lister)
	if !ok {
		return status.Error(codes.Unimplemented, "pathinfo: List is not supported by this store: it is not enumerable; look paths up by hash with Get")
	}
	ctx := stream.Context()
	return l.List(ctx, func(info *storepb.PathInfo) error {
		ti, err := s.ToTvix(ctx, info)
		if err != nil {
			return err
		}
		return stream.Send(ti)
	})
}

// narHasher hashes and counts a NAR.
type narHasher struct {
	h hash.Hash
	n uint64
}

func (w *narHasher) Write(p []byte) (int, error) {
	w.n += uint64(len(p))
	return w.h.Write(p)
}
