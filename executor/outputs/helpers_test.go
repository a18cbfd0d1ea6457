package outputs

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

var functions = []digest.Function{digest.SHA256, digest.BLAKE3}

// recordingStore wraps a BlobAccess and records how blobs reach it.
type recordingStore struct {
	blobstore.BlobAccess
	mu          sync.Mutex
	puts        []digest.Digest // through Put
	batched     []digest.Digest // through PutBatch
	findMissing int             // FindMissing calls
}

func newStore() *recordingStore {
	return &recordingStore{BlobAccess: blobstore.NewMemory(blobstore.CAS, 1<<30)}
}

func (s *recordingStore) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	s.mu.Lock()
	s.puts = append(s.puts, d)
	s.mu.Unlock()
	return s.BlobAccess.Put(ctx, d, r)
}

func (s *recordingStore) PutBatch(ctx context.Context, blobs []blobstore.Blob) []error {
	s.mu.Lock()
	for _, b := range blobs {
		s.batched = append(s.batched, b.Digest)
	}
	s.mu.Unlock()
	// Store through the inner store, so that Puts it makes are not
	// recorded as streamed.
	return blobstore.PutBatch(ctx, s.BlobAccess, blobs)
}

func (s *recordingStore) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	s.mu.Lock()
	s.findMissing++
	s.mu.Unlock()
	return s.BlobAccess.FindMissing(ctx, ds)
}

// uploaded returns every digest stored, by either path.
func (s *recordingStore) uploaded() []digest.Digest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append(append([]digest.Digest(nil), s.puts...), s.batched...)
}

func (s *recordingStore) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.puts, s.batched, s.findMissing = nil, nil, 0
}

func contains(ds []digest.Digest, d digest.Digest) bool {
	for _, x := range ds {
		if x == d {
			return true
		}
	}
	return false
}

// get reads the blob pd from cas.
func get(t testing.TB, cas blobstore.BlobAccess, fn digest.Function, pd *repb.Digest) []byte {
	t.Helper()
	d, err := digest.FromProto(fn, pd)
	if err != nil {
		t.Fatal(err)
	}
	if d == digest.Empty(fn) {
		return nil
	}
	data, err := blobstore.GetBytes(context.Background(), cas, d, 1<<30)
	if err != nil {
		t.Fatalf("get %s: %v", d, err)
	}
	return data
}

// getTree reads and decodes the Tree pd from cas.
func getTree(t testing.TB, cas blobstore.BlobAccess, fn digest.Function, pd *repb.Digest) (*repb.Tree, []byte) {
	t.Helper()
	data := get(t, cas, fn, pd)
	tree := &repb.Tree{}
	if err := proto.Unmarshal(data, tree); err != nil {
		t.Fatal(err)
	}
	return tree, data
}

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeFile creates root/rel with its parents.
func writeFile(t testing.TB, root, rel string, data []byte, mode os.FileMode) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // Undo the umask.
		t.Fatal(err)
	}
}

func mkdir(t testing.TB, root, rel string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(root, rel), 0o755); err != nil {
		t.Fatal(err)
	}
}

func symlink(t testing.TB, root, rel, target string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

// pattern returns n bytes that differ with seed.
func pattern(n int, seed byte) []byte {
	b := bytes.Repeat([]byte{seed, seed + 1, seed + 2, 0xa5}, n/4+1)
	return b[:n]
}
