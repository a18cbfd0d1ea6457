package tvixbuild

import (
	"fmt"
	"slices"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
)

// tree is a REAPI input root under construction: subdirectories being
// built and entries whose trees are already in the CAS.
type tree struct {
	sub   map[string]*tree
	nodes map[string]nar.Node
}

func newTree() *tree { return &tree{sub: map[string]*tree{}, nodes: map[string]nar.Node{}} }

// mkdirAll makes the directory p (slash-separated, relative; "" is the
// root) and returns it.
func (t *tree) mkdirAll(p string) (*tree, error) {
	if p == "" {
		return t, nil
	}
	for _, c := range strings.Split(p, "/") {
		if _, ok := t.nodes[c]; ok {
			return nil, fmt.Errorf("%q: %q is an input or a file, not a directory the build root can add to", p, c)
		}
		s, ok := t.sub[c]
		if !ok {
			s = newTree()
			t.sub[c] = s
		}
		t = s
	}
	return t, nil
}

// place puts n at p, which must not exist yet.
func (t *tree) place(p string, n nar.Node) error {
	dir, name := "", p
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		dir, name = p[:i], p[i+1:]
	}
	d, err := t.mkdirAll(dir)
	if err != nil {
		return err
	}
	if _, ok := d.nodes[name]; ok {
		return fmt.Errorf("%q twice in the build root", p)
	}
	if _, ok := d.sub[name]; ok {
		return fmt.Errorf("%q collides with a directory of the build root", p)
	}
	d.nodes[name] = n
	return nil
}

// finish encodes the tree's Directory messages, adds them to blobs and
// returns the root's digest.
func (t *tree) finish(fn digest.Function, blobs map[digest.Digest][]byte) (digest.Digest, error) {
	dir := &repb.Directory{}
	for name, s := range t.sub {
		d, err := s.finish(fn, blobs)
		if err != nil {
			return digest.Digest{}, err
		}
		dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: name, Digest: d.Proto()})
	}
	for name, n := range t.nodes {
		switch n.Type {
		case nar.Directory:
			dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: name, Digest: n.Digest.Proto()})
		case nar.Regular:
			dir.Files = append(dir.Files, &repb.FileNode{Name: name, Digest: n.Digest.Proto(), IsExecutable: n.Executable})
		case nar.Symlink:
			dir.Symlinks = append(dir.Symlinks, &repb.SymlinkNode{Name: name, Target: n.Target})
		}
	}
	slices.SortFunc(dir.Directories, func(a, b *repb.DirectoryNode) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(dir.Files, func(a, b *repb.FileNode) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(dir.Symlinks, func(a, b *repb.SymlinkNode) int { return strings.Compare(a.Name, b.Name) })
	return putProto(fn, dir, blobs)
}

// putProto encodes m deterministically and adds it to blobs.
func putProto(fn digest.Function, m proto.Message, blobs map[digest.Digest][]byte) (digest.Digest, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return digest.Digest{}, err
	}
	d := digest.Compute(fn, b)
	blobs[d] = b
	return d, nil
}

// blobList turns blobs into a batch for blobstore.PutBatch.
func blobList(blobs map[digest.Digest][]byte) []blobstore.Blob {
	out := make([]blobstore.Blob, 0, len(blobs))
	for d, b := range blobs {
		out = append(out, blobstore.Blob{Digest: d, Data: b})
	}
	return out
}
