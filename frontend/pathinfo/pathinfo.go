// Package pathinfo is the farm's path-info store: for every Nix store path
// the farm holds, where its tree is in the CAS, its NAR hash and size, its
// references, deriver and content address; and for every derivation it
// built, a build record with the outputs and the log.
//
// Store is the interface; NewBlobStore keeps the records in a BlobAccess
// of kind AC (the same stack as the action cache, under keys that cannot
// collide with action digests), NewServer serves a Store over gRPC and
// NewClient is a Store that is a client of one.
package pathinfo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/storepath"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Store holds path infos and build records. Errors are gRPC status
// errors.
type Store interface {
	// Get returns the infos of the paths that are known, by store path.
	Get(ctx context.Context, paths []string) (map[string]*storepb.PathInfo, error)
	// GetByHash returns the info of the path whose hash part (the 32
	// nixbase32 characters after /nix/store/) is hash, or NotFound.
	GetByHash(ctx context.Context, hash string) (*storepb.PathInfo, error)
	// Put stores infos; each must be valid (see Validate).
	Put(ctx context.Context, infos []*storepb.PathInfo) error
	// GetBuild returns the latest build record of drvPath, or NotFound.
	GetBuild(ctx context.Context, drvPath string) (*storepb.Build, error)
	// PutBuild stores a build record.
	PutBuild(ctx context.Context, b *storepb.Build) error
}

// MaxBatch bounds the number of paths in one Get or Put request.
const MaxBatch = 2000

// key returns the AC key of a record: the SHA-256 of a prefix that no
// Action message can start with, and the store path's hash part (path
// infos) or the .drv path (builds). Records are thus never
// returned for action digests and vice versa (collisions aside).
func key(kind, path string) digest.Digest {
	return digest.Compute(digest.SHA256, []byte("tvixfarm.store.v1."+kind+"\x00"+path))
}

// NewBlobStore returns a Store that keeps records in ac. If cas is not
// nil, Put checks that the root of every path's tree is in it.
func NewBlobStore(ac, cas blobstore.BlobAccess) Store {
	return &blobStore{ac: ac, cas: cas}
}

type blobStore struct {
	ac, cas blobstore.BlobAccess
}

func (s *blobStore) Get(ctx context.Context, paths []string) (map[string]*storepb.PathInfo, error) {
	if len(paths) > MaxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: %d paths in one request, at most %d", len(paths), MaxBatch)
	}
	for _, p := range paths {
		if err := storepath.Validate(p); err != nil || !strings.HasPrefix(p, storepath.StoreDir+"/") {
			return nil, status.Errorf(codes.InvalidArgument, "pathinfo: invalid store path %q", p)
		}
	}
	infos := make([]*storepb.PathInfo, len(paths))
	errs := make([]error, len(paths))
	blobstore.ParallelFor(len(paths), func(i int) {
		var info storepb.PathInfo
		found, err := s.read(ctx, key("PathInfo", HashPart(paths[i])), &info)
		if err != nil {
			errs[i] = fmt.Errorf("pathinfo: %s: %w", paths[i], err)
			return
		}
		if found && info.GetStorePath() == paths[i] {
			infos[i] = &info
		}
	})
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	m := make(map[string]*storepb.PathInfo, len(paths))
	for _, info := range infos {
		if info != nil {
			m[info.StorePath] = info
		}
	}
	return m, nil
}

func (s *blobStore) Put(ctx context.Context, infos []*storepb.PathInfo) error {
	if len(infos) > MaxBatch {
		return status.Errorf(codes.InvalidArgument, "pathinfo: %d infos in one request, at most %d", len(infos), MaxBatch)
	}
	var roots []digest.Digest
	for _, info := range infos {
		if err := Validate(info); err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		if d, ok, _ := NodeDigest(info.Node); ok {
			roots = append(roots, d)
		}
	}
	if s.cas != nil && len(roots) > 0 {
		missing, err := findMissing(ctx, s.cas, roots)
		if err != nil {
			return fmt.Errorf("pathinfo: checking trees: %w", err)
		}
		if len(missing) > 0 {
			return status.Errorf(codes.FailedPrecondition, "pathinfo: %d trees are not in the CAS, for example %s", len(missing), missing[0])
		}
	}
	errs := make([]error, len(infos))
	blobstore.ParallelFor(len(infos), func(i int) {
		errs[i] = s.write(ctx, key("PathInfo", HashPart(infos[i].StorePath)), infos[i])
	})
	return errors.Join(errs...)
}

// findMissing calls FindMissing once per digest function.
func findMissing(ctx context.Context, cas blobstore.BlobAccess, ds []digest.Digest) ([]digest.Digest, error) {
	var missing []digest.Digest
	for _, fn := range digest.Functions {
		var of []digest.Digest
		for _, d := range ds {
			if d.Function() == fn {
				of = append(of, d)
			}
		}
		if len(of) == 0 {
			continue
		}
		m, err := cas.FindMissing(ctx, of)
		if err != nil {
			return nil, err
		}
		missing = append(missing, m...)
	}
	return missing, nil
}

func (s *blobStore) GetByHash(ctx context.Context, hash string) (*storepb.PathInfo, error) {
	if len(hash) != 32 || strings.Trim(hash, nixbase32.Alphabet) != "" {
		return nil, status.Errorf(codes.InvalidArgument, "pathinfo: %q is not a store path hash", hash)
	}
	var info storepb.PathInfo
	found, err := s.read(ctx, key("PathInfo", hash), &info)
	if err != nil {
		return nil, fmt.Errorf("pathinfo: %s: %w", hash, err)
	}
	if !found || HashPart(info.StorePath) != hash {
		return nil, status.Errorf(codes.NotFound, "no store path with hash %s on the farm", hash)
	}
	return &info, nil
}

// HashPart returns the 32-character hash part of a store path.
func HashPart(p string) string {
	b := strings.TrimPrefix(p, storepath.StoreDir+"/")
	if len(b) < 32 {
		return b
	}
	return b[:32]
}

func (s *blobStore) GetBuild(ctx context.Context, drvPath string) (*storepb.Build, error) {
	if err := validateDrvPath(drvPath); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var b storepb.Build
	found, err := s.read(ctx, key("Build", drvPath), &b)
	if err != nil {
		return nil, fmt.Errorf("pathinfo: build of %s: %w", drvPath, err)
	}
	if !found || b.DrvPath != drvPath {
		return nil, status.Errorf(codes.NotFound, "no build of %s on the farm", drvPath)
	}
	return &b, nil
}

func (s *blobStore) PutBuild(ctx context.Context, b *storepb.Build) error {
	if err := validateDrvPath(b.GetDrvPath()); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	for name, p := range b.Outputs {
		if err := storepath.Validate(p); err != nil {
			return status.Errorf(codes.InvalidArgument, "build of %s: output %s: %v", b.DrvPath, name, err)
		}
	}
	return s.write(ctx, key("Build", b.DrvPath), b)
}

func (s *blobStore) read(ctx context.Context, k digest.Digest, m proto.Message) (bool, error) {
	r, err := s.ac.Get(ctx, k)
	if status.Code(err) == codes.NotFound {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer r.Close()
	buf := bufPool.Get().(*bytes.Buffer)
	defer bufPool.Put(buf)
	buf.Reset()
	if _, err := io.Copy(buf, io.LimitReader(r, blobstore.MaxACEntrySize+1)); err != nil {
		return false, err
	}
	if err := proto.Unmarshal(buf.Bytes(), m); err != nil {
		return false, status.Errorf(codes.DataLoss, "corrupt record: %v", err)
	}
	return true, nil
}

func (s *blobStore) write(ctx context.Context, k digest.Digest, m proto.Message) error {
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return err
	}
	return s.ac.Put(ctx, k, bytes.NewReader(data))
}

var bufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// NodeDigest returns the digest of the CAS blob at the root of n (the
// Directory or the file), with ok false for a symlink.
func NodeDigest(n *storepb.Node) (d digest.Digest, ok bool, err error) {
	fn, found := digest.FunctionFromName(n.GetDigestFunction())
	if !found {
		return digest.Digest{}, false, fmt.Errorf("unknown digest function %q", n.GetDigestFunction())
	}
	if n.GetKind() == storepb.Node_SYMLINK {
		return digest.Digest{}, false, nil
	}
	pd := n.GetDigest()
	if len(pd.GetHash()) != digest.HashSize || pd.GetSize() < 0 {
		return digest.Digest{}, false, errors.New("invalid digest")
	}
	return digest.New(fn, [digest.HashSize]byte(pd.GetHash()), pd.GetSize()), true, nil
}

// Digest converts a record's digest.
func Digest(fn string, pd *storepb.Digest) (digest.Digest, error) {
	f, ok := digest.FunctionFromName(fn)
	if !ok {
		return digest.Digest{}, fmt.Errorf("unknown digest function %q", fn)
	}
	if len(pd.GetHash()) != digest.HashSize || pd.GetSize() < 0 {
		return digest.Digest{}, errors.New("invalid digest")
	}
	return digest.New(f, [digest.HashSize]byte(pd.GetHash()), pd.GetSize()), nil
}

// DigestProto converts d for a record.
func DigestProto(d digest.Digest) *storepb.Digest {
	h := d.Hash()
	return &storepb.Digest{Hash: h[:], Size: d.Size()}
}

// Validate checks that info is well formed: a valid store path, a node
// of a known kind with a valid digest, a 32-byte NAR hash, references and
// deriver that are valid store paths.
func Validate(info *storepb.PathInfo) error {
	if info == nil {
		return errors.New("empty path info")
	}
	p := info.StorePath
	if err := validStorePath(p); err != nil {
		return err
	}
	n := info.Node
	switch n.GetKind() {
	case storepb.Node_DIRECTORY, storepb.Node_FILE:
		if _, _, err := NodeDigest(n); err != nil {
			return fmt.Errorf("%s: node: %v", p, err)
		}
	case storepb.Node_SYMLINK:
		if n.Target == "" || strings.IndexByte(n.Target, 0) >= 0 || len(n.Target) > 4095 {
			return fmt.Errorf("%s: invalid symlink target", p)
		}
	default:
		return fmt.Errorf("%s: node of unknown kind %v", p, n.GetKind())
	}
	if len(info.NarSha256) != 32 {
		return fmt.Errorf("%s: NAR hash is %d bytes, want 32", p, len(info.NarSha256))
	}
	if !slices.IsSorted(info.References) {
		return fmt.Errorf("%s: references are not sorted", p)
	}
	for _, r := range info.References {
		if err := validStorePath(r); err != nil {
			return fmt.Errorf("%s: reference: %v", p, err)
		}
	}
	if info.Deriver != "" {
		if err := validateDrvPath(info.Deriver); err != nil {
			return fmt.Errorf("%s: deriver: %v", p, err)
		}
	}
	return nil
}

func validStorePath(p string) error {
	if !strings.HasPrefix(p, storepath.StoreDir+"/") {
		return fmt.Errorf("%q is not in %s", p, storepath.StoreDir)
	}
	if err := storepath.Validate(p); err != nil {
		return fmt.Errorf("invalid store path %q: %v", p, err)
	}
	return nil
}

func validateDrvPath(p string) error {
	if err := validStorePath(p); err != nil {
		return err
	}
	if !strings.HasSuffix(p, ".drv") {
		return fmt.Errorf("%q is not a derivation", p)
	}
	return nil
}
