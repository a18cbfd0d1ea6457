package nar

import (
	"context"
	"fmt"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Type is the type of a Node: one of the three kinds of object a NAR
// holds.
type Type uint8

const (
	// Directory is a directory, stored in the CAS as a REAPI Directory
	// message.
	Directory Type = iota + 1
	// Regular is a regular file, executable or not.
	Regular
	// Symlink is a symbolic link.
	Symlink
)

// String returns the name the NAR format uses for t.
func (t Type) String() string {
	switch t {
	case Directory:
		return "directory"
	case Regular:
		return "regular"
	case Symlink:
		return "symlink"
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Node is the root of a store path as REAPI sees it: a directory (the
// digest of its Directory message), a regular file (the digest of its
// contents and its executable bit) or a symlink (its target).
type Node struct {
	Type Type
	// Digest identifies the Directory message of a directory or the
	// contents of a regular file.
	Digest digest.Digest
	// Executable is set for an executable regular file.
	Executable bool
	// Target is the target of a symlink.
	Target string
}

// DirectoryNode returns the Node of the directory whose Directory message
// has digest d.
func DirectoryNode(d digest.Digest) Node { return Node{Type: Directory, Digest: d} }

// FileNode returns the Node of a regular file whose contents have digest
// d.
func FileNode(d digest.Digest, executable bool) Node {
	return Node{Type: Regular, Digest: d, Executable: executable}
}

// SymlinkNode returns the Node of a symlink to target.
func SymlinkNode(target string) Node { return Node{Type: Symlink, Target: target} }

// check reports whether n can be serialised.
func (n Node) check() error {
	switch n.Type {
	case Directory, Regular:
		if n.Digest.IsZero() {
			return fmt.Errorf("nar: %s node without a digest", n.Type)
		}
	case Symlink:
		return checkTarget(n.Target)
	default:
		return fmt.Errorf("nar: invalid node type %d", n.Type)
	}
	return nil
}

// FromOutputFile returns the Node of an output file of an ActionResult
// whose digests use fn.
func FromOutputFile(fn digest.Function, f *repb.OutputFile) (Node, error) {
	d, err := digest.FromProto(fn, f.GetDigest())
	if err != nil {
		return Node{}, fmt.Errorf("output file %q: %w", f.GetPath(), err)
	}
	return FileNode(d, f.GetIsExecutable()), nil
}

// FromOutputSymlink returns the Node of an output symlink of an
// ActionResult.
func FromOutputSymlink(s *repb.OutputSymlink) (Node, error) {
	if err := checkTarget(s.GetTarget()); err != nil {
		return Node{}, fmt.Errorf("output symlink %q: %w", s.GetPath(), err)
	}
	return SymlinkNode(s.GetTarget()), nil
}

// FromOutputDirectory returns the Node of an output directory of an
// ActionResult and makes sure Write can read it: the directory's Tree is
// read from cas and its Directory messages are stored in cas as blobs of
// their own, as StoreTreeDirectories does. An output directory with only
// root_directory_digest (REAPI's DIRECTORY_ONLY format) is taken as is:
// its Directory messages are in the CAS already.
func FromOutputDirectory(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, od *repb.OutputDirectory) (Node, error) {
	var root digest.Digest
	if od.GetRootDirectoryDigest() != nil {
		var err error
		if root, err = digest.FromProto(fn, od.GetRootDirectoryDigest()); err != nil {
			return Node{}, fmt.Errorf("output directory %q: root directory: %w", od.GetPath(), err)
		}
		if od.GetTreeDigest() == nil {
			return DirectoryNode(root), nil
		}
	}
	td, err := digest.FromProto(fn, od.GetTreeDigest())
	if err != nil {
		return Node{}, fmt.Errorf("output directory %q: tree: %w", od.GetPath(), err)
	}
	data, err := blobstore.GetBytes(ctx, cas, td, maxTreeSize)
	if err != nil {
		return Node{}, fmt.Errorf("output directory %q: read tree %s: %w", od.GetPath(), td, err)
	}
	dirs, err := splitTree(data)
	if err != nil {
		return Node{}, fmt.Errorf("output directory %q: tree %s: %w", od.GetPath(), td, err)
	}
	got, err := storeDirectories(ctx, cas, fn, dirs)
	if err != nil {
		return Node{}, fmt.Errorf("output directory %q: tree %s: %w", od.GetPath(), td, err)
	}
	if !root.IsZero() && got != root {
		return Node{}, fmt.Errorf("output directory %q: root_directory_digest %s does not match the root of tree %s (%s)", od.GetPath(), root, td, got)
	}
	return DirectoryNode(got), nil
}

// FromActionResult returns the Node of the output of ar whose path is
// path, looking at every output field (files, directories and the three
// symlink lists), and whether there is one. An output directory's Tree is
// handled as FromOutputDirectory does.
func FromActionResult(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, ar *repb.ActionResult, path string) (Node, bool, error) {
	for _, f := range ar.GetOutputFiles() {
		if f.GetPath() == path {
			n, err := FromOutputFile(fn, f)
			return n, true, err
		}
	}
	for _, od := range ar.GetOutputDirectories() {
		if od.GetPath() == path {
			n, err := FromOutputDirectory(ctx, cas, fn, od)
			return n, true, err
		}
	}
	for _, ss := range [][]*repb.OutputSymlink{ar.GetOutputSymlinks(), ar.GetOutputFileSymlinks(), ar.GetOutputDirectorySymlinks()} {
		for _, s := range ss {
			if s.GetPath() == path {
				n, err := FromOutputSymlink(s)
				return n, true, err
			}
		}
	}
	return Node{}, false, nil
}

// maxTreeSize bounds the Tree messages FromOutputDirectory reads, and
// maxDirectorySize the Directory messages Write reads.
const (
	maxTreeSize      = 1 << 30
	maxDirectorySize = 64 << 20
)

// StoreTreeDirectories stores the root and children of tree in cas under
// fn as blobs of their own, each serialized deterministically, so that the
// directory can be read one Directory message at a time (by Write). One
// FindMissing call finds the messages cas lacks, and only those are
// uploaded. It returns the digest of the root Directory. Every directory a
// message of tree refers to must be in tree.
func StoreTreeDirectories(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, tree *repb.Tree) (root digest.Digest, err error) {
	if tree.GetRoot() == nil {
		return digest.Digest{}, fmt.Errorf("nar: tree has no root")
	}
	opts := proto.MarshalOptions{Deterministic: true}
	dirs := make([][]byte, 0, 1+len(tree.GetChildren()))
	for _, d := range append([]*repb.Directory{tree.GetRoot()}, tree.GetChildren()...) {
		data, err := opts.Marshal(d)
		if err != nil {
			return digest.Digest{}, fmt.Errorf("nar: marshal directory: %w", err)
		}
		dirs = append(dirs, data)
	}
	return storeDirectories(ctx, cas, fn, dirs)
}

// splitTree splits a serialized Tree into its serialized Directory
// messages, root first, keeping the bytes as they are: producers compute
// the digests of the children from these bytes.
func splitTree(data []byte) ([][]byte, error) {
	var dirs [][]byte
	var root []byte
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return nil, fmt.Errorf("malformed Tree: %w", protowire.ParseError(n))
		}
		data = data[n:]
		if (num == 1 || num == 2) && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return nil, fmt.Errorf("malformed Tree: %w", protowire.ParseError(n))
			}
			data = data[n:]
			if num == 1 {
				root = v // The last one wins, as in proto3.
			} else {
				dirs = append(dirs, v)
			}
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, data)
		if n < 0 {
			return nil, fmt.Errorf("malformed Tree: %w", protowire.ParseError(n))
		}
		data = data[n:]
	}
	if root == nil {
		return nil, fmt.Errorf("tree has no root")
	}
	return append([][]byte{root}, dirs...), nil
}

// storeDirectories stores the serialized Directory messages dirs (root
// first) that cas lacks, after checking that they parse and that every
// directory they refer to is among them, and returns the root's digest.
func storeDirectories(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, dirs [][]byte) (digest.Digest, error) {
	type msg struct {
		d    digest.Digest
		data []byte
	}
	// The empty Directory is the empty blob, which CAS servers treat as
	// always present: it is neither required in the tree nor stored.
	empty := digest.Empty(fn)
	have := map[digest.Digest]bool{empty: true}
	var msgs []msg
	var refs []struct{ from, to digest.Digest }
	for _, data := range dirs {
		d := digest.Compute(fn, data)
		if have[d] {
			continue
		}
		have[d] = true
		msgs = append(msgs, msg{d, data})
		var pd repb.Directory
		if err := proto.Unmarshal(data, &pd); err != nil {
			return digest.Digest{}, fmt.Errorf("directory %s: %w", d, err)
		}
		for _, c := range pd.GetDirectories() {
			cd, err := digest.FromProto(fn, c.GetDigest())
			if err != nil {
				return digest.Digest{}, fmt.Errorf("directory %s: entry %q: %w", d, c.GetName(), err)
			}
			refs = append(refs, struct{ from, to digest.Digest }{d, cd})
		}
	}
	for _, r := range refs {
		if !have[r.to] {
			return digest.Digest{}, fmt.Errorf("directory %s refers to directory %s, which the tree does not hold", r.from, r.to)
		}
	}
	root := digest.Compute(fn, dirs[0])
	if len(msgs) == 0 {
		return root, nil
	}
	ds := make([]digest.Digest, len(msgs))
	for i, m := range msgs {
		ds[i] = m.d
	}
	missing, err := cas.FindMissing(ctx, ds)
	if err != nil {
		return digest.Digest{}, fmt.Errorf("find missing directories: %w", err)
	}
	if len(missing) > 0 {
		want := make(map[digest.Digest]bool, len(missing))
		for _, d := range missing {
			want[d] = true
		}
		var blobs []blobstore.Blob
		for _, m := range msgs {
			if want[m.d] {
				blobs = append(blobs, blobstore.Blob{Digest: m.d, Data: m.data})
			}
		}
		if err := putBlobs(ctx, cas, blobs); err != nil {
			return digest.Digest{}, err
		}
	}
	return root, nil
}
