package tvix

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"tvixfarm/cas/castore"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// writeCastoreNAR writes the NAR of the anonymous castore node n, reading
// the castore tree itself. CalculateNAR uses it for trees that have no
// REAPI equivalent (names that are not UTF-8); others are rendered by
// frontend/nar from their REAPI tree, which fetches ahead. The output is
// Nix's: entries of a directory in the byte order of their names,
// whatever list they are in.
func (s *Service) writeCastoreNAR(ctx context.Context, n *castorepb.Node, w io.Writer) error {
	bw := bufio.NewWriterSize(w, 128<<10)
	nw := &castoreNAR{s: s, w: bw}
	nw.str("nix-archive-1")
	if err := nw.node(ctx, n, 0); err != nil {
		return err
	}
	return bw.Flush()
}

type castoreNAR struct {
	s *Service
	w *bufio.Writer
}

var zeros [8]byte

func (nw *castoreNAR) u64(n uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], n)
	nw.w.Write(b[:])
}

func (nw *castoreNAR) bytes(b []byte) {
	nw.u64(uint64(len(b)))
	nw.w.Write(b)
	nw.w.Write(zeros[:(8-len(b)%8)%8])
}

func (nw *castoreNAR) str(ss ...string) {
	for _, s := range ss {
		nw.bytes([]byte(s))
	}
}

func (nw *castoreNAR) node(ctx context.Context, n *castorepb.Node, depth int) error {
	if depth > 4096 {
		return fmt.Errorf("castore tree nested deeper than 4096")
	}
	switch {
	case n.GetFile() != nil:
		f := n.GetFile()
		nw.str("(", "type", "regular")
		if f.Executable {
			nw.str("executable", "")
		}
		nw.str("contents")
		rc, d, err := nw.s.st.OpenBlob(ctx, [castore.DigestLen]byte(f.Digest))
		if err != nil {
			return fmt.Errorf("file contents %x: %w", f.Digest, err)
		}
		defer rc.Close()
		if uint64(d.Size()) != f.Size {
			return fmt.Errorf("file contents %x: %d bytes, the node says %d", f.Digest, d.Size(), f.Size)
		}
		nw.u64(f.Size)
		if _, err := io.CopyN(nw.w, rc, d.Size()); err != nil {
			return fmt.Errorf("file contents %x: %w", f.Digest, err)
		}
		nw.w.Write(zeros[:(8-f.Size%8)%8])
		nw.str(")")
	case n.GetSymlink() != nil:
		nw.str("(", "type", "symlink", "target")
		nw.bytes(n.GetSymlink().Target)
		nw.str(")")
	case n.GetDirectory() != nil:
		dir, err := nw.s.st.GetDirectory(ctx, [castore.DigestLen]byte(n.GetDirectory().Digest))
		if err != nil {
			return err
		}
		var es []*castorepb.Node
		for _, c := range dir.Directories {
			es = append(es, &castorepb.Node{Node: &castorepb.Node_Directory{Directory: c}})
		}
		for _, c := range dir.Files {
			es = append(es, &castorepb.Node{Node: &castorepb.Node_File{File: c}})
		}
		for _, c := range dir.Symlinks {
			es = append(es, &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: c}})
		}
		slices.SortFunc(es, func(a, b *castorepb.Node) int { return bytes.Compare(castore.NodeName(a), castore.NodeName(b)) })
		nw.str("(", "type", "directory")
		for _, e := range es {
			nw.str("entry", "(", "name")
			nw.bytes(castore.NodeName(e))
			nw.str("node")
			if err := nw.node(ctx, e, depth+1); err != nil {
				return err
			}
			nw.str(")")
		}
		nw.str(")")
	default:
		return fmt.Errorf("no node set")
	}
	return nil
}
