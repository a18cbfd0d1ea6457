package castore

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"unicode/utf8"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/zeebo/blake3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// The mapping between castore trees and REAPI trees.
//
// Files are the same blobs in both: a castore FileNode's BLAKE3 digest and
// size are the REAPI BLAKE3 digest. Directories differ (castore digests
// are bytes and count entries; REAPI digests are hex strings with a byte
// size), so a tree has one Directory message of each kind per directory,
// both stored in the CAS. ToREAPI and FromREAPI convert whole trees and
// record the result for the root in the action-cache-kind store, under
// keys derived from the root's hash that no action digest can take, in
// both directions; a recorded mapping whose target root has left the CAS
// is recomputed. Only BLAKE3 REAPI trees can be mapped, and only castore
// trees whose names are UTF-8 (REAPI names are proto strings).

// ErrNotUTF8 is wrapped by the error of ToREAPI for a tree with a name or
// symlink target that is not UTF-8: REAPI names and targets are proto
// strings. The error is also a FailedPrecondition status.
var ErrNotUTF8 = errors.New("castore: not UTF-8")

// statusError is a gRPC status that wraps a sentinel error.
type statusError struct {
	st  *status.Status
	err error
}

func (e *statusError) Error() string              { return e.st.Message() }
func (e *statusError) GRPCStatus() *status.Status { return e.st }
func (e *statusError) Unwrap() error              { return e.err }

// mappingKey returns the action-cache key of the mapping of a root.
func mappingKey(kind string, h [DigestLen]byte) digest.Digest {
	return digest.Compute(digest.SHA256, []byte("tvixfarm.castore.v1."+kind+"\x00"+hex.EncodeToString(h[:])))
}

// ToREAPI returns the REAPI (BLAKE3) digest of the REAPI Directory tree
// equivalent to the castore directory h, after storing its Directory
// messages in the CAS. A missing castore directory is FailedPrecondition.
func (s *Store) ToREAPI(ctx context.Context, h [DigestLen]byte) (digest.Digest, error) {
	if h == EmptyDigest {
		return digest.Empty(digest.BLAKE3), nil
	}
	k := mappingKey("toreapi", h)
	if data, err := blobstore.GetBytes(ctx, s.ac, k, 1024); err == nil {
		var pd repb.Digest
		if proto.Unmarshal(data, &pd) == nil {
			if d, err := digest.FromProto(digest.BLAKE3, &pd); err == nil {
				if missing, err := s.cas.FindMissing(ctx, []digest.Digest{d}); err == nil && len(missing) == 0 {
					return d, nil
				}
			}
		}
	}
	t := &toREAPI{s: s, done: map[[DigestLen]byte]reapiDone{}}
	d, _, err := t.dir(ctx, h, nil, 0)
	if err != nil {
		return digest.Digest{}, err
	}
	if err := s.putLeavesFirst(ctx, t.blobs); err != nil {
		return digest.Digest{}, fmt.Errorf("castore: store REAPI tree of %s: %w", hexDigest(h[:]), err)
	}
	s.record(ctx, h, d, 0, false)
	return d, nil
}

type reapiDone struct {
	d      digest.Digest
	height int
}

type toREAPI struct {
	s     *Store
	done  map[[DigestLen]byte]reapiDone
	blobs []leveled
}

func (t *toREAPI) dir(ctx context.Context, h [DigestLen]byte, name []byte, depth int) (digest.Digest, int, error) {
	if r, ok := t.done[h]; ok {
		return r.d, r.height, nil
	}
	if depth > 4096 {
		return digest.Digest{}, 0, status.Error(codes.InvalidArgument, "castore: directories nested deeper than 4096")
	}
	cd, err := t.s.GetDirectory(ctx, h)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return digest.Digest{}, 0, status.Errorf(codes.FailedPrecondition, "castore: directory %q (%s) is not stored", name, hexDigest(h[:]))
		}
		return digest.Digest{}, 0, err
	}
	rd := &repb.Directory{}
	height := 0
	utf := func(b []byte) (string, error) {
		if !utf8.Valid(b) {
			return "", &statusError{status.Newf(codes.FailedPrecondition, "castore: name %q in %s is not UTF-8 and has no REAPI equivalent", b, hexDigest(h[:])), ErrNotUTF8}
		}
		return string(b), nil
	}
	for _, n := range cd.Directories {
		nm, err := utf(n.Name)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		ch, err := toHash(n.Digest)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		cdg, cht, err := t.dir(ctx, ch, n.Name, depth+1)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		height = max(height, cht+1)
		rd.Directories = append(rd.Directories, &repb.DirectoryNode{Name: nm, Digest: cdg.Proto()})
	}
	for _, n := range cd.Files {
		nm, err := utf(n.Name)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		fd := digest.New(digest.BLAKE3, [DigestLen]byte(n.Digest), int64(n.Size))
		rd.Files = append(rd.Files, &repb.FileNode{Name: nm, Digest: fd.Proto(), IsExecutable: n.Executable})
	}
	for _, n := range cd.Symlinks {
		nm, err := utf(n.Name)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		tg, err := utf(n.Target)
		if err != nil {
			return digest.Digest{}, 0, err
		}
		rd.Symlinks = append(rd.Symlinks, &repb.SymlinkNode{Name: nm, Target: tg})
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(rd)
	if err != nil {
		return digest.Digest{}, 0, status.Errorf(codes.Internal, "castore: encode REAPI directory: %v", err)
	}
	d := digest.Compute(digest.BLAKE3, data)
	if d.Size() > 0 {
		t.blobs = append(t.blobs, leveled{height, blobstore.Blob{Digest: d, Data: data}})
	}
	t.done[h] = reapiDone{d, height}
	return d, height, nil
}

// FromREAPI returns the castore digest and the DirectoryNode size (2N+Σ,
// as Tvix computes) of the castore tree equivalent to the REAPI directory
// d, after storing its Directory messages in the CAS. d's tree must use
// BLAKE3; a missing REAPI directory is FailedPrecondition.
func (s *Store) FromREAPI(ctx context.Context, d digest.Digest) ([DigestLen]byte, uint64, error) {
	if d.Function() != digest.BLAKE3 {
		return [DigestLen]byte{}, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI tree %s uses %s, castore needs BLAKE3", d, d.Function())
	}
	if d.Size() == 0 {
		return EmptyDigest, 0, nil
	}
	k := mappingKey("fromreapi", d.Hash())
	if data, err := blobstore.GetBytes(ctx, s.ac, k, 1024); err == nil {
		var dn castorepb.DirectoryNode
		if proto.Unmarshal(data, &dn) == nil && len(dn.Digest) == DigestLen {
			h := [DigestLen]byte(dn.Digest)
			if _, err := s.StatBlob(ctx, h); err == nil {
				return h, dn.Size, nil
			}
		}
	}
	f := &fromREAPI{s: s, done: map[digest.Digest]castoreDone{}}
	h, size, _, err := f.dir(ctx, d, "", 0)
	if err != nil {
		return [DigestLen]byte{}, 0, err
	}
	if err := s.putLeavesFirst(ctx, f.blobs); err != nil {
		return [DigestLen]byte{}, 0, fmt.Errorf("castore: store castore tree of %s: %w", d, err)
	}
	s.record(ctx, h, d, size, true)
	return h, size, nil
}

// record stores the mapping of a root in both directions. Failures only
// cost a recomputation later.
func (s *Store) record(ctx context.Context, h [DigestLen]byte, d digest.Digest, size uint64, fromREAPI bool) {
	to, _ := proto.Marshal(d.Proto())
	_ = blobstore.PutBytes(ctx, s.ac, mappingKey("toreapi", h), to)
	if fromREAPI {
		from, _ := proto.Marshal(&castorepb.DirectoryNode{Digest: h[:], Size: size})
		_ = blobstore.PutBytes(ctx, s.ac, mappingKey("fromreapi", d.Hash()), from)
	}
}

type castoreDone struct {
	h      [DigestLen]byte
	size   uint64
	height int
}

type fromREAPI struct {
	s     *Store
	done  map[digest.Digest]castoreDone
	blobs []leveled
}

func (f *fromREAPI) dir(ctx context.Context, d digest.Digest, name string, depth int) ([DigestLen]byte, uint64, int, error) {
	if r, ok := f.done[d]; ok {
		return r.h, r.size, r.height, nil
	}
	if depth > 4096 {
		return [DigestLen]byte{}, 0, 0, status.Error(codes.InvalidArgument, "castore: directories nested deeper than 4096")
	}
	var rd repb.Directory
	if d.Size() > 0 {
		data, err := blobstore.GetBytes(ctx, f.s.cas, d, MaxDirectorySize)
		if err != nil {
			if blobstore.IsNotFound(err) {
				return [DigestLen]byte{}, 0, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI directory %q (%s) is not stored", name, d)
			}
			return [DigestLen]byte{}, 0, 0, err
		}
		if err := proto.Unmarshal(data, &rd); err != nil {
			return [DigestLen]byte{}, 0, 0, status.Errorf(codes.DataLoss, "castore: blob %s is not a REAPI Directory: %v", d, err)
		}
	}
	cd := &castorepb.Directory{}
	height := 0
	for _, n := range rd.Directories {
		nd, err := digest.FromProto(digest.BLAKE3, n.Digest)
		if err != nil {
			return [DigestLen]byte{}, 0, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI directory %s: %q: %v", d, n.Name, err)
		}
		ch, size, cht, err := f.dir(ctx, nd, n.Name, depth+1)
		if err != nil {
			return [DigestLen]byte{}, 0, 0, err
		}
		height = max(height, cht+1)
		cd.Directories = append(cd.Directories, &castorepb.DirectoryNode{Name: []byte(n.Name), Digest: ch[:], Size: size})
	}
	for _, n := range rd.Files {
		fd, err := digest.FromProto(digest.BLAKE3, n.Digest)
		if err != nil {
			return [DigestLen]byte{}, 0, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI directory %s: %q: %v", d, n.Name, err)
		}
		fh := fd.Hash()
		cd.Files = append(cd.Files, &castorepb.FileNode{Name: []byte(n.Name), Digest: fh[:], Size: uint64(fd.Size()), Executable: n.IsExecutable})
	}
	for _, n := range rd.Symlinks {
		cd.Symlinks = append(cd.Symlinks, &castorepb.SymlinkNode{Name: []byte(n.Name), Target: []byte(n.Target)})
	}
	if err := Validate(cd); err != nil {
		return [DigestLen]byte{}, 0, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI directory %s has no castore equivalent: %v", d, err)
	}
	size, err := Size(cd)
	if err != nil {
		return [DigestLen]byte{}, 0, 0, status.Errorf(codes.FailedPrecondition, "castore: REAPI directory %s: %v", d, err)
	}
	data, err := Encode(cd)
	if err != nil {
		return [DigestLen]byte{}, 0, 0, status.Errorf(codes.Internal, "%v", err)
	}
	h := [DigestLen]byte(blake3.Sum256(data))
	if len(data) > 0 {
		f.blobs = append(f.blobs, leveled{height, blobstore.Blob{Digest: digest.New(digest.BLAKE3, h, int64(len(data))), Data: data}})
	}
	f.done[d] = castoreDone{h, size, height}
	return h, size, height, nil
}
