package pathinfo

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"tvixfarm/cas/blobstore"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

func listAll(t *testing.T, s *Indexed) []string {
	t.Helper()
	var got []string
	if err := s.List(context.Background(), func(info *storepb.PathInfo) error {
		got = append(got, info.StorePath)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestIndexed: put paths are listed, once, in order, across a reopen; a
// torn last line is dropped; indexed paths the store lost are skipped.
func TestIndexed(t *testing.T) {
	ctx := context.Background()
	cas := blobstore.NewMemory(blobstore.CAS, 1<<20)
	base := NewBlobStore(blobstore.NewMemory(blobstore.AC, 1<<20), cas)
	file := filepath.Join(t.TempDir(), "pathinfo.index")
	s, err := NewIndexed(base, file)
	if err != nil {
		t.Fatal(err)
	}
	if got := listAll(t, s); len(got) != 0 {
		t.Fatalf("empty store lists %v", got)
	}
	if err := s.Put(ctx, []*storepb.PathInfo{info(t, cas, pathB), info(t, cas, pathA)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, []*storepb.PathInfo{info(t, cas, pathA)}); err != nil { // again
		t.Fatal(err)
	}
	want := []string{pathB, pathA}
	slices.Sort(want)
	if got := listAll(t, s); !slices.Equal(got, want) {
		t.Fatalf("List %v, want %v", got, want)
	}
	// A rejected Put indexes nothing.
	bad := info(t, cas, "/nix/store/short-x")
	if err := s.Put(ctx, []*storepb.PathInfo{bad}); err == nil {
		t.Fatal("an invalid path info was accepted")
	}
	s.Close()
	// A torn line, and a path the store does not have.
	f, _ := os.OpenFile(file, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("/nix/store/x72kdl72irdhls3jglkpi80ylayrccvj-lost\n/nix/store/x72kdl7")
	f.Close()
	s, err = NewIndexed(base, file)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := listAll(t, s); !slices.Equal(got, want) {
		t.Fatalf("after reopening: List %v, want %v", got, want)
	}
	if err := s.Put(ctx, []*storepb.PathInfo{info(t, cas, drvOut)}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(file)
	if want := pathB + "\n" + pathA + "\n/nix/store/x72kdl72irdhls3jglkpi80ylayrccvj-lost\n" + drvOut + "\n"; string(data) != want {
		t.Errorf("index file %q, want %q", data, want)
	}
}

const drvOut = "/nix/store/0bnjziiy6yiwihpas1773kbz6q9rrj7m-out"
