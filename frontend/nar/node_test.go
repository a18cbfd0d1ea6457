package nar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/executor/outputs"
)

// TestFromActionResult runs the executor's output collection on trees
// and checks that the Nodes of its ActionResult write the NAR Nix writes:
// an output directory (Tree), a file, an executable file and a symlink.
func TestFromActionResult(t *testing.T) {
	ctx := context.Background()
	for _, fn := range digest.Functions {
		inputRoot := t.TempDir()
		treeCases[0].build(t, inputRoot+"/out/dir")   // nested
		treeCases[1].build(t, inputRoot+"/out/names") // names
		writeFile(t, inputRoot+"/file", "a file", 0o444)
		writeFile(t, inputRoot+"/exec", "#!/bin/sh\n", 0o511)
		symlink(t, "/nix/store/target", inputRoot+"/link")
		mkdir(t, inputRoot+"/empty")
		cas := newCAS()
		cmd := &repb.Command{OutputPaths: []string{"out", "file", "exec", "link", "empty", "missing"}}
		res, err := outputs.Collect(ctx, cas, fn, inputRoot, cmd, outputs.Options{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range cmd.OutputPaths {
			n, ok, err := FromActionResult(ctx, cas, fn, res.ActionResult, p)
			if p == "missing" {
				if ok || err != nil {
					t.Errorf("missing output: %v, %v", ok, err)
				}
				continue
			}
			if !ok || err != nil {
				t.Fatalf("%s: FromActionResult: %v, %v", p, ok, err)
			}
			var b bytes.Buffer
			if err := Write(ctx, cas, fn, n, &b); err != nil {
				t.Fatalf("%s: Write: %v", p, err)
			}
			checkSameNAR(t, fn.String()+" "+p, b.Bytes(), nixStoreDump(t, filepath.Join(inputRoot, p)))
		}
	}
}

// treeOf returns the REAPI Tree of an ingested directory, and a CAS that
// holds the file contents but no Directory message.
func treeOf(t *testing.T, root string, fn digest.Function) (*repb.Tree, blobstore.BlobAccess, Node) {
	t.Helper()
	ing, err := Ingest(context.Background(), root, fn)
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[digest.Digest]*repb.Directory{}
	cas := newCAS()
	for _, b := range ing.Blobs {
		var pd repb.Directory
		if b.Data != nil && proto.Unmarshal(b.Data, &pd) == nil && digest.Compute(fn, b.Data) == b.Digest && isDirectory(ing, b.Digest) {
			dirs[b.Digest] = &pd
			continue
		}
		single := &Ingested{Blobs: []Blob{b}}
		if err := Upload(context.Background(), cas, single); err != nil {
			t.Fatal(err)
		}
	}
	tree := &repb.Tree{Root: dirs[ing.Node.Digest]}
	for d, pd := range dirs {
		if d != ing.Node.Digest {
			tree.Children = append(tree.Children, pd)
		}
	}
	return tree, cas, ing.Node
}

// isDirectory reports whether d is a Directory message of ing.
func isDirectory(ing *Ingested, d digest.Digest) bool {
	if ing.Node.Digest == d {
		return true
	}
	for _, b := range ing.Blobs {
		var pd repb.Directory
		if b.Data == nil || proto.Unmarshal(b.Data, &pd) != nil {
			continue
		}
		for _, c := range pd.Directories {
			if c.Digest.Hash == d.Hex() && c.Digest.SizeBytes == d.Size() {
				return true
			}
		}
	}
	return false
}

func TestStoreTreeDirectories(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "p")
	treeCases[0].build(t, root)
	want := nixStoreDump(t, root)
	tree, files, node := treeOf(t, root, digest.SHA256)
	cas := &countingCAS{BlobAccess: files}
	got, err := StoreTreeDirectories(ctx, cas, digest.SHA256, tree)
	if err != nil {
		t.Fatal(err)
	}
	if got != node.Digest || cas.finds.Load() != 1 || cas.puts.Load() != int64(1+len(tree.Children)) {
		t.Errorf("root %s (want %s), %d FindMissing, %d puts", got, node.Digest, cas.finds.Load(), cas.puts.Load())
	}
	var b bytes.Buffer
	if err := Write(ctx, cas, digest.SHA256, DirectoryNode(got), &b); err != nil {
		t.Fatal(err)
	}
	checkSameNAR(t, "Write", b.Bytes(), want)
	// Again: nothing is missing, nothing is stored.
	puts := cas.puts.Load()
	if _, err := StoreTreeDirectories(ctx, cas, digest.SHA256, tree); err != nil || cas.puts.Load() != puts {
		t.Errorf("second call: %v, %d puts", err, cas.puts.Load()-puts)
	}

	// Through an OutputDirectory: the Tree is read from the CAS.
	treeData, _ := proto.MarshalOptions{Deterministic: true}.Marshal(tree)
	td := digest.Compute(digest.SHA256, treeData)
	_, files2, _ := treeOf(t, root, digest.SHA256)
	if err := blobstore.PutBytes(ctx, files2, td, treeData); err != nil {
		t.Fatal(err)
	}
	od := &repb.OutputDirectory{Path: "out", TreeDigest: td.Proto(), RootDirectoryDigest: node.Digest.Proto()}
	n, err := FromOutputDirectory(ctx, files2, digest.SHA256, od)
	if err != nil || n != node {
		t.Fatalf("FromOutputDirectory = %v, %v", n, err)
	}
	od.RootDirectoryDigest = digest.Compute(digest.SHA256, []byte("other")).Proto()
	if _, err := FromOutputDirectory(ctx, files2, digest.SHA256, od); err == nil {
		t.Error("FromOutputDirectory accepted a wrong root_directory_digest")
	}
	// DIRECTORY_ONLY: the root digest is taken as is.
	od = &repb.OutputDirectory{Path: "out", RootDirectoryDigest: node.Digest.Proto()}
	if n, err := FromOutputDirectory(ctx, newCAS(), digest.SHA256, od); err != nil || n != node {
		t.Errorf("FromOutputDirectory without a tree = %v, %v", n, err)
	}

	// A Tree that lacks a child is refused.
	if len(tree.Children) > 0 {
		broken := &repb.Tree{Root: tree.Root, Children: tree.Children[1:]}
		if _, err := StoreTreeDirectories(ctx, newCAS(), digest.SHA256, broken); err == nil || !strings.Contains(err.Error(), "does not hold") {
			t.Errorf("StoreTreeDirectories of an incomplete tree: %v", err)
		}
	}
	if _, err := StoreTreeDirectories(ctx, newCAS(), digest.SHA256, &repb.Tree{}); err == nil {
		t.Error("StoreTreeDirectories accepted a tree without root")
	}
	if _, err := splitTree([]byte{0x0a, 0x05, 0x01}); err == nil {
		t.Error("splitTree accepted a truncated tree")
	}
}

// putDir stores a Directory message and returns its digest.
func putDir(t *testing.T, cas blobstore.BlobAccess, pd *repb.Directory) digest.Digest {
	t.Helper()
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(pd)
	if err != nil {
		t.Fatal(err)
	}
	d := digest.Compute(digest.SHA256, data)
	if err := blobstore.PutBytes(context.Background(), cas, d, data); err != nil {
		t.Fatal(err)
	}
	return d
}

func putFile(t *testing.T, cas blobstore.BlobAccess, data string) *repb.Digest {
	t.Helper()
	d := digest.Compute(digest.SHA256, []byte(data))
	if err := blobstore.PutBytes(context.Background(), cas, d, []byte(data)); err != nil {
		t.Fatal(err)
	}
	return d.Proto()
}

// TestWriteDirectoryMessages writes Directory messages made by hand: the
// lists are merged and sorted whatever their order, and malformed ones
// are errors.
func TestWriteDirectoryMessages(t *testing.T) {
	ctx := context.Background()
	cas := newCAS()
	sub := putDir(t, cas, &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: putFile(t, cas, "sub")}}})
	good := &repb.Directory{
		// Out of order, and interleaved across the lists.
		Files:       []*repb.FileNode{{Name: "z", Digest: putFile(t, cas, "z"), IsExecutable: true}, {Name: "b", Digest: putFile(t, cas, "b")}},
		Directories: []*repb.DirectoryNode{{Name: "c", Digest: sub.Proto()}, {Name: "a", Digest: sub.Proto()}},
		Symlinks:    []*repb.SymlinkNode{{Name: "y", Target: "z"}, {Name: "_", Target: "/abs"}},
	}
	root := filepath.Join(t.TempDir(), "p")
	writeFile(t, root+"/z", "z", 0o555)
	writeFile(t, root+"/b", "b", 0o444)
	writeFile(t, root+"/c/f", "sub", 0o444)
	writeFile(t, root+"/a/f", "sub", 0o444)
	symlink(t, "z", root+"/y")
	symlink(t, "/abs", root+"/_")
	var b bytes.Buffer
	if err := Write(ctx, cas, digest.SHA256, DirectoryNode(putDir(t, cas, good)), &b); err != nil {
		t.Fatal(err)
	}
	checkSameNAR(t, "Write", b.Bytes(), nixStoreDump(t, root))

	f := putFile(t, cas, "x")
	for name, pd := range map[string]*repb.Directory{
		"duplicate": {Files: []*repb.FileNode{{Name: "x", Digest: f}}, Symlinks: []*repb.SymlinkNode{{Name: "x", Target: "t"}}},
		"slash":     {Files: []*repb.FileNode{{Name: "a/b", Digest: f}}},
		"dotdot":    {Files: []*repb.FileNode{{Name: "..", Digest: f}}},
		"dot":       {Directories: []*repb.DirectoryNode{{Name: ".", Digest: sub.Proto()}}},
		"empty":     {Files: []*repb.FileNode{{Name: "", Digest: f}}},
		"nul":       {Files: []*repb.FileNode{{Name: "a\x00b", Digest: f}}},
		"target":    {Symlinks: []*repb.SymlinkNode{{Name: "l", Target: ""}}},
		"digest":    {Files: []*repb.FileNode{{Name: "x", Digest: &repb.Digest{Hash: "nothex", SizeBytes: 1}}}},
		"nodigest":  {Files: []*repb.FileNode{{Name: "x"}}},
	} {
		err := Write(ctx, cas, digest.SHA256, DirectoryNode(putDir(t, cas, pd)), &bytes.Buffer{})
		if err == nil {
			t.Errorf("%s: Write accepted %v", name, pd)
		}
	}
	for _, n := range []Node{{}, {Type: Directory}, {Type: Regular}, SymlinkNode(""), {Type: 9}} {
		if err := Write(ctx, cas, digest.SHA256, n, &bytes.Buffer{}); err == nil {
			t.Errorf("Write accepted %+v", n)
		}
	}
	// A missing directory, a missing file: errors that name the entry.
	missing := digest.Compute(digest.SHA256, []byte("missing"))
	pd := &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: missing.Proto()}}}
	if err := Write(ctx, cas, digest.SHA256, DirectoryNode(putDir(t, cas, pd)), &bytes.Buffer{}); status.Code(err) != codes.NotFound {
		t.Errorf("missing directory: %v", err)
	}
	pd = &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: putDir(t, cas, &repb.Directory{
		Files: []*repb.FileNode{{Name: "gone", Digest: missing.Proto()}}}).Proto()}}}
	err := Write(ctx, cas, digest.SHA256, DirectoryNode(putDir(t, cas, pd)), &bytes.Buffer{})
	if !blobstore.IsNotFound(err) || !strings.Contains(err.Error(), "/d/gone") {
		t.Errorf("missing file: %v", err)
	}
	// A blob of the wrong size: the CAS is wrong, Write says so.
	short := digest.New(digest.SHA256, digest.Compute(digest.SHA256, []byte("x")).Hash(), 5)
	if err := Write(ctx, liarCAS{cas}, digest.SHA256, FileNode(short, false), &bytes.Buffer{}); err == nil {
		t.Error("Write accepted a short blob")
	}
	pd = &repb.Directory{Files: []*repb.FileNode{{Name: "short", Digest: short.Proto()}}}
	if err := Write(ctx, liarCAS{cas}, digest.SHA256, DirectoryNode(putDir(t, cas, pd)), &bytes.Buffer{}); err == nil {
		t.Error("Write accepted a short prefetched blob")
	}
}

// liarCAS serves the blob "x" whatever digest is asked for.
type liarCAS struct{ blobstore.BlobAccess }

func (l liarCAS) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if d.Size() == 5 {
		return l.BlobAccess.Get(ctx, digest.Compute(digest.SHA256, []byte("x")))
	}
	return l.BlobAccess.Get(ctx, d)
}

// TestWritePrefetches checks that Write keeps Gets in flight for a tree
// of many small files in a slow CAS, within its bound, and that a
// failure or a cancellation stops it without leaking goroutines.
func TestWritePrefetches(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "p")
	smallTree(t, root, 400)
	want := nixStoreDump(t, root)
	mem := newCAS()
	ing := ingestInto(t, mem, root, digest.SHA256)
	const delay = 5 * time.Millisecond
	slow := &countingCAS{BlobAccess: mem, delay: delay}
	start := time.Now()
	var b bytes.Buffer
	if err := Write(ctx, slow, digest.SHA256, ing.Node, &b); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	checkSameNAR(t, "Write", b.Bytes(), want)
	gets := slow.gets.Load()
	t.Logf("%d Gets of %v each took %v in all (%v one by one); at most %d in flight", gets, delay, elapsed, time.Duration(gets)*delay, slow.maxInFlight.Load())
	if elapsed > time.Duration(gets)*delay/4 {
		t.Errorf("Write took %v for %d Gets of %v: not prefetching", elapsed, gets, delay)
	}
	if m := slow.maxInFlight.Load(); m > fetchConcurrency {
		t.Errorf("%d Gets in flight, bound is %d", m, fetchConcurrency)
	}

	before := runtime.NumGoroutine()
	// A blob fails in the middle of the tree.
	var victim digest.Digest
	for _, bl := range ing.Blobs {
		if bl.Path == "" && bl.Digest.Size() > 200 && bl.Digest.Size() < 4000 {
			victim = bl.Digest
		}
	}
	failing := &countingCAS{BlobAccess: mem, delay: time.Millisecond, fail: map[digest.Digest]error{victim: status.Error(codes.Unavailable, "injected")}}
	err := Write(ctx, failing, digest.SHA256, ing.Node, &bytes.Buffer{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(errString(err), "injected") {
		t.Errorf("Write with a failing Get: %v", err)
	}
	// Cancelled half way.
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	err = Write(cctx, &countingCAS{BlobAccess: mem, delay: 10 * time.Millisecond}, digest.SHA256, ing.Node, &bytes.Buffer{})
	if status.Code(err) != codes.DeadlineExceeded && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Write cancelled: %v", err)
	}
	// A writer that fails.
	if err := Write(ctx, mem, digest.SHA256, ing.Node, failWriter{}); !errors.Is(err, errWrite) {
		t.Errorf("Write to a failing writer: %v", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines before, %d after", before, n)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

var errWrite = errors.New("disk on fire")

type failWriter struct{}

func (failWriter) Write(p []byte) (int, error) { return 0, errWrite }
