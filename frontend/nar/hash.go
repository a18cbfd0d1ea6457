package nar

import (
	"context"
	"crypto/sha256"
	"hash"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Hasher is an io.Writer that computes the SHA-256 and size of a NAR
// written to it and the store paths the NAR refers to, as Nix does when it
// registers a build output.
type Hasher struct {
	h    hash.Hash
	n    uint64
	scan *Scanner // nil without candidates
}

// NewHasher returns a Hasher that looks for references to the store paths
// candidates (see NewScanner). For a build output, the candidates are the
// closure of the derivation's inputs and its own output paths.
func NewHasher(candidates []string) (*Hasher, error) {
	h := &Hasher{h: sha256.New()}
	if len(candidates) > 0 {
		s, err := NewScanner(candidates)
		if err != nil {
			return nil, err
		}
		h.scan = s
	}
	return h, nil
}

// Write adds p to the NAR. It never fails.
func (h *Hasher) Write(p []byte) (int, error) {
	h.h.Write(p)
	h.n += uint64(len(p))
	if h.scan != nil {
		h.scan.Write(p)
	}
	return len(p), nil
}

// Sum returns the SHA-256 and size of the NAR written so far and the
// candidates it refers to, sorted.
func (h *Hasher) Sum() (narHash [32]byte, narSize uint64, refs []string) {
	h.h.Sum(narHash[:0])
	if h.scan != nil {
		refs = h.scan.References()
	}
	return narHash, h.n, refs
}

// PathInfo is what Nix records about a store path's contents.
type PathInfo struct {
	// NarHash is the SHA-256 of the NAR serialisation.
	NarHash [32]byte
	// NarSize is the size of the NAR serialisation.
	NarSize uint64
	// References are the candidate store paths the NAR refers to, sorted.
	References []string
}

// NarHashString returns the NAR hash as Nix prints it: "sha256:" and
// nix32.
func (pi PathInfo) NarHashString() string {
	return "sha256:" + nixbase32.EncodeToString(pi.NarHash[:])
}

// Info computes the NAR hash and size of n, read from cas, and the store
// paths among candidates it refers to.
func Info(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, n Node, candidates []string) (PathInfo, error) {
	h, err := NewHasher(candidates)
	if err != nil {
		return PathInfo{}, err
	}
	if err := Write(ctx, cas, fn, n, h); err != nil {
		return PathInfo{}, err
	}
	var pi PathInfo
	pi.NarHash, pi.NarSize, pi.References = h.Sum()
	return pi, nil
}
