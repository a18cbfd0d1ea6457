package inputs

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// store is a CAS for tests that counts Gets and can serve corrupt bytes.
type store struct {
	blobstore.BlobAccess
	fn digest.Function

	mu      sync.Mutex
	gets    map[digest.Digest]int
	corrupt map[digest.Digest]bool
}

func newStore(t testing.TB, fn digest.Function) *store {
	t.Helper()
	return &store{
		BlobAccess: blobstore.NewMemory(blobstore.CAS, 1<<30),
		fn:         fn,
		gets:       make(map[digest.Digest]int),
		corrupt:    make(map[digest.Digest]bool),
	}
}

func (s *store) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	s.mu.Lock()
	s.gets[d]++
	bad := s.corrupt[d]
	s.mu.Unlock()
	if !bad {
		return s.BlobAccess.Get(ctx, d)
	}
	data, err := blobstore.GetBytes(ctx, s.BlobAccess, d, 1<<30)
	if err != nil {
		return nil, err
	}
	wrong := bytes.Clone(data)
	wrong[0] ^= 0xff
	return io.NopCloser(bytes.NewReader(wrong)), nil
}

func (s *store) getCount(d digest.Digest) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gets[d]
}

func (s *store) totalGets() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.gets {
		n += c
	}
	return n
}

// blob stores data and returns its digest.
func (s *store) blob(t testing.TB, data string) digest.Digest {
	t.Helper()
	d := digest.Compute(s.fn, []byte(data))
	if err := blobstore.PutBytes(context.Background(), s, d, []byte(data)); err != nil {
		t.Fatal(err)
	}
	return d
}

// dir stores a Directory built from nodes (*repb.FileNode,
// *repb.DirectoryNode, *repb.SymlinkNode) and returns its digest.
func (s *store) dir(t testing.TB, nodes ...any) digest.Digest {
	t.Helper()
	d, data := encodeDir(t, s.fn, nodes...)
	if err := blobstore.PutBytes(context.Background(), s, d, data); err != nil {
		t.Fatal(err)
	}
	return d
}

func encodeDir(t testing.TB, fn digest.Function, nodes ...any) (digest.Digest, []byte) {
	t.Helper()
	pb := &repb.Directory{}
	for _, n := range nodes {
		switch n := n.(type) {
		case *repb.FileNode:
			pb.Files = append(pb.Files, n)
		case *repb.DirectoryNode:
			pb.Directories = append(pb.Directories, n)
		case *repb.SymlinkNode:
			pb.Symlinks = append(pb.Symlinks, n)
		default:
			t.Fatalf("bad node %T", n)
		}
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(pb)
	if err != nil {
		t.Fatal(err)
	}
	return digest.Compute(fn, data), data
}

func file(name string, d digest.Digest, executable bool) *repb.FileNode {
	return &repb.FileNode{Name: name, Digest: d.Proto(), IsExecutable: executable}
}

func subdir(name string, d digest.Digest) *repb.DirectoryNode {
	return &repb.DirectoryNode{Name: name, Digest: d.Proto()}
}

func symlink(name, target string) *repb.SymlinkNode {
	return &repb.SymlinkNode{Name: name, Target: target}
}

// newCache returns a Cache in a temporary directory, closed at the end of
// the test.
func newCache(t testing.TB, maxSize int64, cas blobstore.BlobAccess) *Cache {
	t.Helper()
	c, err := NewCache(filepath.Join(t.TempDir(), "cache"), maxSize, cas)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newDst returns a new empty destination directory.
func newDst(t testing.TB) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "root")
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// listTree returns the relative paths below dir.
func listTree(t testing.TB, dir string) []string {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(dir, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			r, _ := filepath.Rel(dir, p)
			paths = append(paths, r)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return paths
}
