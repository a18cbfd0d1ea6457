package tvixbuild

import (
	"context"
	"fmt"

	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// StoreTrees is Trees on a castore.Store.
type StoreTrees struct{ S *castore.Store }

// ToREAPI converts a castore root node; a directory's REAPI tree is
// stored by the Store.
func (t StoreTrees) ToREAPI(ctx context.Context, n *castorepb.Node) (nar.Node, error) {
	switch {
	case n.GetDirectory() != nil:
		d, err := t.S.ToREAPI(ctx, [castore.DigestLen]byte(n.GetDirectory().Digest))
		if err != nil {
			return nar.Node{}, err
		}
		return nar.DirectoryNode(d), nil
	case n.GetFile() != nil:
		f := n.GetFile()
		return nar.FileNode(digest.New(digest.BLAKE3, [digest.HashSize]byte(f.Digest), int64(f.Size)), f.Executable), nil
	case n.GetSymlink() != nil:
		return nar.SymlinkNode(string(n.GetSymlink().Target)), nil
	}
	return nar.Node{}, fmt.Errorf("empty node")
}

// ToCastore converts a REAPI root node; a directory's castore tree is
// stored by the Store.
func (t StoreTrees) ToCastore(ctx context.Context, n nar.Node, name []byte) (*castorepb.Node, error) {
	switch n.Type {
	case nar.Directory:
		h, size, err := t.S.FromREAPI(ctx, n.Digest)
		if err != nil {
			return nil, err
		}
		return &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Name: name, Digest: h[:], Size: size}}}, nil
	case nar.Regular:
		h := n.Digest.Hash()
		return &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Name: name, Digest: h[:], Size: uint64(n.Digest.Size()), Executable: n.Executable}}}, nil
	case nar.Symlink:
		return &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: &castorepb.SymlinkNode{Name: name, Target: []byte(n.Target)}}}, nil
	}
	return nil, fmt.Errorf("node of unknown type %v", n.Type)
}
