// Package castore is Tvix's content-addressed store (castore) on the farm's
// CAS: the Directory model (canonical encoding, BLAKE3 digests, validation,
// the size field), a Store that keeps castore blobs and Directory messages as
// the CAS's own BLAKE3 blobs, the mapping between castore trees and REAPI
// trees, and the BlobService and DirectoryService gRPC servers, registered
// under both tvix.castore.v1 and snix.castore.v1 (their messages are
// wire-identical).
//
// A castore blob is the CAS blob with the same BLAKE3 hash: there is no copy
// and no second store. A castore Directory is stored as a CAS blob too, under
// the BLAKE3 of its canonical encoding, which is its castore digest.
package castore

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"strconv"

	"github.com/zeebo/blake3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// Limits of castore names and symlink targets (Tvix's MAX_NAME_LEN and
// MAX_TARGET_LEN).
const (
	MaxNameLen   = 255
	MaxTargetLen = 4095
	// DigestLen is the length of every castore digest (BLAKE3-256).
	DigestLen = 32
)

// EmptyDigest is the BLAKE3 of nothing: the digest of the empty blob and of
// the empty Directory (whose encoding is empty).
var EmptyDigest = [DigestLen]byte(blake3.Sum256(nil))

// Encode returns the canonical encoding of d: proto3 with fields in field
// number order, defaults omitted and no unknown fields, which is what
// Tvix's prost encoding produces. d's unknown fields are dropped.
func Encode(d *castorepb.Directory) ([]byte, error) {
	stripUnknown(d)
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(d)
	if err != nil {
		return nil, fmt.Errorf("castore: encode directory: %w", err)
	}
	return b, nil
}

// Digest returns the castore digest of d: the BLAKE3 of its canonical
// encoding, and the encoding.
func Digest(d *castorepb.Directory) ([DigestLen]byte, []byte, error) {
	b, err := Encode(d)
	if err != nil {
		return [DigestLen]byte{}, nil, err
	}
	return blake3.Sum256(b), b, nil
}

func stripUnknown(d *castorepb.Directory) {
	clear := func(m protoreflect.Message) {
		if len(m.GetUnknown()) > 0 {
			m.SetUnknown(nil)
		}
	}
	clear(d.ProtoReflect())
	for _, n := range d.Directories {
		clear(n.ProtoReflect())
	}
	for _, n := range d.Files {
		clear(n.ProtoReflect())
	}
	for _, n := range d.Symlinks {
		clear(n.ProtoReflect())
	}
}

// Size returns the value Tvix and Snix clients put in the DirectoryNode
// that refers to d, and check it against: 2 per entry plus the sizes of
// the subdirectories (Rust's castore::Directory::size; the proto comment's
// formula, 1 per entry, is not what clients compute). It fails on
// overflow.
func Size(d *castorepb.Directory) (uint64, error) {
	n := uint64(len(d.Directories) + len(d.Files) + len(d.Symlinks))
	s := 2 * n
	for _, c := range d.Directories {
		var carry uint64
		s, carry = bits.Add64(s, c.Size, 0)
		if carry != 0 {
			return 0, errors.New("castore: directory size overflows")
		}
	}
	return s, nil
}

// ValidateName checks a castore name: not empty, not "." or "..", no '/'
// or NUL, at most MaxNameLen bytes. Other bytes, also non-UTF-8, are
// allowed.
func ValidateName(name []byte) error {
	switch {
	case len(name) == 0:
		return errors.New("empty name")
	case len(name) > MaxNameLen:
		return fmt.Errorf("name of %d bytes, at most %d", len(name), MaxNameLen)
	case string(name) == "." || string(name) == "..":
		return fmt.Errorf("name %q", name)
	case bytes.IndexByte(name, '/') >= 0:
		return fmt.Errorf("name %q contains '/'", name)
	case bytes.IndexByte(name, 0) >= 0:
		return fmt.Errorf("name %q contains NUL", name)
	}
	return nil
}

// ValidateTarget checks a symlink target: not empty, no NUL, at most
// MaxTargetLen bytes; absolute or relative.
func ValidateTarget(t []byte) error {
	switch {
	case len(t) == 0:
		return errors.New("empty symlink target")
	case len(t) > MaxTargetLen:
		return fmt.Errorf("symlink target of %d bytes, at most %d", len(t), MaxTargetLen)
	case bytes.IndexByte(t, 0) >= 0:
		return errors.New("symlink target contains NUL")
	}
	return nil
}

// Validate checks d as Tvix does: valid names, each list strictly sorted by
// name bytes, a name in at most one list, 32-byte digests, valid symlink
// targets, and a size that does not overflow. It does not check the sizes
// of subdirectories against the subdirectories (Store.PutDirectories
// accepts what clients send).
func Validate(d *castorepb.Directory) error {
	seen := make(map[string]string, len(d.Directories)+len(d.Files)+len(d.Symlinks))
	check := func(kind string, i int, name, prev []byte) error {
		if err := ValidateName(name); err != nil {
			return fmt.Errorf("%s %d: %v", kind, i, err)
		}
		if i > 0 {
			switch c := bytes.Compare(prev, name); {
			case c == 0:
				return fmt.Errorf("%s %q: duplicate name", kind, name)
			case c > 0:
				return fmt.Errorf("%s %q: wrong sorting (after %q)", kind, name, prev)
			}
		}
		if other, ok := seen[string(name)]; ok {
			return fmt.Errorf("%s %q: duplicate name (also a %s)", kind, name, other)
		}
		seen[string(name)] = kind
		return nil
	}
	for i, n := range d.Directories {
		var prev []byte
		if i > 0 {
			prev = d.Directories[i-1].Name
		}
		if err := check("directory", i, n.Name, prev); err != nil {
			return err
		}
		if len(n.Digest) != DigestLen {
			return fmt.Errorf("directory %q: invalid digest length %d", n.Name, len(n.Digest))
		}
	}
	for i, n := range d.Files {
		var prev []byte
		if i > 0 {
			prev = d.Files[i-1].Name
		}
		if err := check("file", i, n.Name, prev); err != nil {
			return err
		}
		if len(n.Digest) != DigestLen {
			return fmt.Errorf("file %q: invalid digest length %d", n.Name, len(n.Digest))
		}
	}
	for i, n := range d.Symlinks {
		var prev []byte
		if i > 0 {
			prev = d.Symlinks[i-1].Name
		}
		if err := check("symlink", i, n.Name, prev); err != nil {
			return err
		}
		if err := ValidateTarget(n.Target); err != nil {
			return fmt.Errorf("symlink %q: %v", n.Name, err)
		}
	}
	if _, err := Size(d); err != nil {
		return err
	}
	return nil
}

// ValidateNode checks a root node. With anonymous, its name must be empty
// (CalculateNAR, Snix build outputs); otherwise it must be a valid name.
func ValidateNode(n *castorepb.Node, anonymous bool) error {
	var name []byte
	switch {
	case n.GetDirectory() != nil:
		d := n.GetDirectory()
		name = d.Name
		if len(d.Digest) != DigestLen {
			return fmt.Errorf("directory node: invalid digest length %d", len(d.Digest))
		}
	case n.GetFile() != nil:
		f := n.GetFile()
		name = f.Name
		if len(f.Digest) != DigestLen {
			return fmt.Errorf("file node: invalid digest length %d", len(f.Digest))
		}
	case n.GetSymlink() != nil:
		s := n.GetSymlink()
		name = s.Name
		if err := ValidateTarget(s.Target); err != nil {
			return fmt.Errorf("symlink node: %v", err)
		}
	default:
		return errors.New("no node set")
	}
	if anonymous {
		if len(name) != 0 {
			return fmt.Errorf("node named %q, want an anonymous node", name)
		}
		return nil
	}
	return ValidateName(name)
}

// NodeName returns the name of n.
func NodeName(n *castorepb.Node) []byte {
	switch {
	case n.GetDirectory() != nil:
		return n.GetDirectory().Name
	case n.GetFile() != nil:
		return n.GetFile().Name
	case n.GetSymlink() != nil:
		return n.GetSymlink().Name
	}
	return nil
}

// WithName returns a copy of n named name.
func WithName(n *castorepb.Node, name []byte) *castorepb.Node {
	switch {
	case n.GetDirectory() != nil:
		d := proto.CloneOf(n.GetDirectory())
		d.Name = name
		return &castorepb.Node{Node: &castorepb.Node_Directory{Directory: d}}
	case n.GetFile() != nil:
		f := proto.CloneOf(n.GetFile())
		f.Name = name
		return &castorepb.Node{Node: &castorepb.Node_File{File: f}}
	case n.GetSymlink() != nil:
		s := proto.CloneOf(n.GetSymlink())
		s.Name = name
		return &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: s}}
	}
	return &castorepb.Node{}
}

// hexDigest formats a castore digest for messages.
func hexDigest(h []byte) string {
	const hexd = "0123456789abcdef"
	if len(h) != DigestLen {
		return "(invalid digest of " + strconv.Itoa(len(h)) + " bytes)"
	}
	b := make([]byte, 2*len(h))
	for i, c := range h {
		b[2*i], b[2*i+1] = hexd[c>>4], hexd[c&15]
	}
	return "blake3:" + string(b)
}
