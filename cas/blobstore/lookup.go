package blobstore

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// HashLookup is implemented by backends that can find a BLAKE3 blob by its
// hash alone. Tvix's castore names blobs and Directory messages by their
// BLAKE3 hash without a size, while every REAPI digest carries one; with
// HashLookup the castore services serve the CAS's own BLAKE3 blobs, whoever
// uploaded them, instead of keeping a second store or a size table.
type HashLookup interface {
	// LookupHash returns the digest of the stored BLAKE3 blob with hash h,
	// or a NotFound error. It does not extend the blob's lifetime.
	LookupHash(ctx context.Context, h [digest.HashSize]byte) (digest.Digest, error)
}

// LookupHash finds the BLAKE3 blob with hash h in ba. Backends that do not
// implement HashLookup (redis, a remote REAPI CAS) answer Unimplemented.
func LookupHash(ctx context.Context, ba BlobAccess, h [digest.HashSize]byte) (digest.Digest, error) {
	if l, ok := ba.(HashLookup); ok {
		return l.LookupHash(ctx, h)
	}
	return digest.Digest{}, status.Errorf(codes.Unimplemented, "the %T store cannot find blobs by hash alone (castore needs a disk or memory CAS)", ba)
}

// hashIndex maps the hashes of BLAKE3 blobs to their sizes, for
// HashLookup. Its owner guards it.
type hashIndex map[[digest.HashSize]byte]int64

func (x hashIndex) add(d digest.Digest) {
	if d.Function() == digest.BLAKE3 {
		x[d.Hash()] = d.Size()
	}
}

func (x hashIndex) remove(d digest.Digest) {
	if d.Function() != digest.BLAKE3 {
		return
	}
	if sz, ok := x[d.Hash()]; ok && sz == d.Size() {
		delete(x, d.Hash())
	}
}

func (x hashIndex) lookup(k Kind, h [digest.HashSize]byte) (digest.Digest, error) {
	sz, ok := x[h]
	if !ok {
		d := digest.New(digest.BLAKE3, h, 0)
		return digest.Digest{}, status.Errorf(codes.NotFound, "%s: blob blake3:%s not found", k, d.Hex())
	}
	return digest.New(digest.BLAKE3, h, sz), nil
}

func (m *memory) LookupHash(ctx context.Context, h [digest.HashSize]byte) (digest.Digest, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.byHash.lookup(m.kind, h)
}

func (s *disk) LookupHash(ctx context.Context, h [digest.HashSize]byte) (digest.Digest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byHash.lookup(s.kind, h)
}

func (m *metricsBlobAccess) LookupHash(ctx context.Context, h [digest.HashSize]byte) (digest.Digest, error) {
	return LookupHash(ctx, m.BlobAccess, h)
}

// LookupHash looks in the local store, then in the remote one.
func (t *tiered) LookupHash(ctx context.Context, h [digest.HashSize]byte) (digest.Digest, error) {
	d, err := LookupHash(ctx, t.local, h)
	if err == nil || (!IsNotFound(err) && status.Code(err) != codes.Unimplemented) {
		return d, err
	}
	return LookupHash(ctx, t.remote, h)
}
