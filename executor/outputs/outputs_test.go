package outputs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

func TestResolvePath(t *testing.T) {
	for _, tc := range []struct {
		wd, p, want string
	}{
		{"", "out", "out"},
		{"", "a/b/c", "a/b/c"},
		{"build", "out", "build/out"},
		{"build", "../nix/store/abc-out", "nix/store/abc-out"},
		{"build/sub", "../../nix/store/abc-out", "nix/store/abc-out"},
		{"build", ".", "build"},
		{"build/", "./x//y/", "build/x/y"},
		{"a/b", "../../x", "x"},
	} {
		got, err := ResolvePath(tc.wd, tc.p)
		if err != nil || got != tc.want {
			t.Errorf("ResolvePath(%q, %q) = %q, %v; want %q", tc.wd, tc.p, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ wd, p string }{
		{"", ""},
		{"build", ""},
		{"", "/abs"},
		{"build", "/etc/passwd"},
		{"", ".."},
		{"", "../x"},
		{"build", "../../x"},
		{"", "a/../../b"},
		{"build", "../../build/x"}, // leaves the root, even if it comes back
		{"", "."},
		{"build", ".."},
		{"/abs", "x"},
		{"..", "x"},
		{"a/../..", "x"},
		{"", "a\x00b"},
		{"", "bad\xff"},
	} {
		got, err := ResolvePath(tc.wd, tc.p)
		if err == nil {
			t.Errorf("ResolvePath(%q, %q) = %q, want an error", tc.wd, tc.p, got)
		} else if status.Code(err) != codes.InvalidArgument {
			t.Errorf("ResolvePath(%q, %q): %v, want INVALID_ARGUMENT", tc.wd, tc.p, err)
		}
	}
}

// fixture populates an input root with every kind of output.
func fixture(t *testing.T) string {
	root := t.TempDir()
	writeFile(t, root, "build/bin/tool", []byte("#!/bin/sh\necho hi\n"), 0o755)
	writeFile(t, root, "build/data.txt", []byte("data\n"), 0o644)
	writeFile(t, root, "build/empty", nil, 0o644)
	writeFile(t, root, "build/tree/a.txt", []byte("a"), 0o644)
	writeFile(t, root, "build/tree/exec", []byte("x"), 0o700)
	writeFile(t, root, "build/tree/sub/deeper/c.txt", []byte("c"), 0o444)
	writeFile(t, root, "build/tree/sub/empty", nil, 0o644)
	mkdir(t, root, "build/tree/emptydir")
	symlink(t, root, "build/tree/shadow", "/etc/shadow")
	symlink(t, root, "build/tree/sub/rel", "../a.txt")
	symlink(t, root, "build/shadowlink", "/etc/shadow")
	symlink(t, root, "build/dirlink", "tree")
	return root
}

func TestCollectOutputPaths(t *testing.T) {
	for _, fn := range functions {
		t.Run(fn.String(), func(t *testing.T) {
			root := fixture(t)
			cas := newStore()
			cmd := &repb.Command{
				WorkingDirectory: "build",
				OutputPaths:      []string{"bin/tool", "data.txt", "dirlink", "empty", "missing", "missing-dir/x", "shadowlink", "tree"},
			}
			res, err := Collect(context.Background(), cas, fn, root, cmd, Options{})
			if err != nil {
				t.Fatal(err)
			}
			ar := res.ActionResult
			wantFiles := []struct {
				path string
				data string
				exec bool
			}{
				{"bin/tool", "#!/bin/sh\necho hi\n", true},
				{"data.txt", "data\n", false},
				{"empty", "", false},
			}
			if len(ar.OutputFiles) != len(wantFiles) {
				t.Fatalf("output files = %v, want %d", ar.OutputFiles, len(wantFiles))
			}
			for i, w := range wantFiles {
				f := ar.OutputFiles[i]
				if f.Path != w.path || f.IsExecutable != w.exec {
					t.Errorf("output file %d = %v, want %s exec=%v", i, f, w.path, w.exec)
				}
				if want := digest.Compute(fn, []byte(w.data)).Proto(); !proto_equal(f.Digest, want) {
					t.Errorf("%s: digest %v, want %v", f.Path, f.Digest, want)
				}
				if got := get(t, cas, fn, f.Digest); string(got) != w.data {
					t.Errorf("%s: CAS has %q, want %q", f.Path, got, w.data)
				}
			}
			wantLinks := []*repb.OutputSymlink{{Path: "dirlink", Target: "tree"}, {Path: "shadowlink", Target: "/etc/shadow"}}
			if !slices.EqualFunc(ar.OutputSymlinks, wantLinks, func(a, b *repb.OutputSymlink) bool { return a.Path == b.Path && a.Target == b.Target }) {
				t.Errorf("output symlinks = %v, want %v", ar.OutputSymlinks, wantLinks)
			}
			if len(ar.OutputFileSymlinks)+len(ar.OutputDirectorySymlinks) != 0 {
				t.Errorf("legacy symlink fields set for output_paths: %v %v", ar.OutputFileSymlinks, ar.OutputDirectorySymlinks)
			}
			if len(ar.OutputDirectories) != 1 || ar.OutputDirectories[0].Path != "tree" {
				t.Fatalf("output directories = %v", ar.OutputDirectories)
			}
			od := ar.OutputDirectories[0]
			if !od.IsTopologicallySorted {
				t.Error("tree is not marked topologically sorted")
			}
			tree, _ := getTree(t, cas, fn, od.TreeDigest)
			if got := digest.Compute(fn, marshal(t, tree.Root)).Proto(); !proto_equal(od.RootDirectoryDigest, got) {
				t.Errorf("root_directory_digest = %v, root of the tree has %v", od.RootDirectoryDigest, got)
			}
			byDigest := checkTree(t, cas, fn, tree)
			root0 := tree.Root
			if names := fileNames(root0); !slices.Equal(names, []string{"a.txt", "exec"}) {
				t.Errorf("root files = %v", names)
			}
			if !root0.Files[1].IsExecutable || root0.Files[0].IsExecutable {
				t.Errorf("root files executable bits = %v", root0.Files)
			}
			if len(root0.Symlinks) != 1 || root0.Symlinks[0].Name != "shadow" || root0.Symlinks[0].Target != "/etc/shadow" {
				t.Errorf("root symlinks = %v", root0.Symlinks)
			}
			if len(root0.Directories) != 2 || root0.Directories[0].Name != "emptydir" || root0.Directories[1].Name != "sub" {
				t.Fatalf("root directories = %v", root0.Directories)
			}
			if d := root0.Directories[0].Digest; d.SizeBytes != 0 || d.Hash != digest.Empty(fn).Hex() {
				t.Errorf("empty directory digest = %v", d)
			}
			sub := byDigest[root0.Directories[1].Digest.Hash]
			if sub == nil || len(sub.Symlinks) != 1 || sub.Symlinks[0].Target != "../a.txt" || len(sub.Directories) != 1 || sub.Directories[0].Name != "deeper" {
				t.Errorf("sub = %v", sub)
			}
			if res.Stats.Files != 3+4 {
				t.Errorf("stats.Files = %d, want 7", res.Stats.Files)
			}
			if cas.findMissing != 1 {
				t.Errorf("FindMissing called %d times, want 1", cas.findMissing)
			}
			if contains(cas.uploaded(), digest.Empty(fn)) {
				t.Error("the empty blob was uploaded")
			}
			shadow, err := os.ReadFile("/etc/shadow")
			if err == nil && len(shadow) > 0 && contains(cas.uploaded(), digest.Compute(fn, shadow)) {
				t.Error("the contents of /etc/shadow were uploaded")
			}
		})
	}
}

func proto_equal(a, b *repb.Digest) bool {
	return a.GetHash() == b.GetHash() && a.GetSizeBytes() == b.GetSizeBytes()
}

func fileNames(d *repb.Directory) []string {
	var names []string
	for _, f := range d.Files {
		names = append(names, f.Name)
	}
	return names
}

// checkTree checks the invariants of a topologically sorted Tree, that
// every blob it references is in cas, and returns its directories by hash.
func checkTree(t *testing.T, cas *recordingStore, fn digest.Function, tree *repb.Tree) map[string]*repb.Directory {
	t.Helper()
	all := append([]*repb.Directory{tree.Root}, tree.Children...)
	index := make(map[string]int)
	byDigest := make(map[string]*repb.Directory)
	for i, d := range all {
		dd := digest.Compute(fn, marshal(t, d))
		if _, dup := index[dd.Hex()]; dup && i > 0 {
			t.Errorf("directory %s stored twice in the tree", dd)
		}
		index[dd.Hex()] = i
		byDigest[dd.Hex()] = d
		// Directory messages are in the CAS too (unless empty).
		if dd != digest.Empty(fn) {
			if got := get(t, cas, fn, dd.Proto()); !bytes.Equal(got, marshal(t, d)) {
				t.Errorf("directory %s: CAS has different bytes", dd)
			}
		}
	}
	for i, d := range all {
		sorted := func(names []string) {
			if !slices.IsSorted(names) {
				t.Errorf("directory %d: entries not sorted: %v", i, names)
			}
		}
		var fs, ds, ss []string
		for _, f := range d.Files {
			fs = append(fs, f.Name)
			get(t, cas, fn, f.Digest) // Present.
		}
		for _, c := range d.Directories {
			ds = append(ds, c.Name)
			j, ok := index[c.Digest.Hash]
			if !ok {
				t.Errorf("directory %d: child %s (%s) is not in the tree", i, c.Name, c.Digest.Hash)
			} else if j <= i {
				t.Errorf("directory %d: child %s stored at %d, before its parent", i, c.Name, j)
			}
			if want := digest.Compute(fn, marshal(t, byDigest[c.Digest.Hash])); c.Digest.SizeBytes != want.Size() {
				t.Errorf("directory %d: child %s has size %d, its message %d", i, c.Name, c.Digest.SizeBytes, want.Size())
			}
		}
		for _, s := range d.Symlinks {
			ss = append(ss, s.Name)
		}
		sorted(fs)
		sorted(ds)
		sorted(ss)
	}
	return byDigest
}

func TestCollectTreeDedupAndEncoding(t *testing.T) {
	for _, fn := range functions {
		t.Run(fn.String(), func(t *testing.T) {
			root := t.TempDir()
			for _, d := range []string{"out/x", "out/y", "out/z/x"} {
				writeFile(t, root, d+"/f", []byte("same"), 0o644)
				writeFile(t, root, d+"/g/h", []byte("same too"), 0o644)
			}
			writeFile(t, root, "out/b", []byte("b"), 0o644)
			cas := newStore()
			res, err := Collect(context.Background(), cas, fn, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			od := res.ActionResult.OutputDirectories[0]
			tree, raw := getTree(t, cas, fn, od.TreeDigest)
			checkTree(t, cas, fn, tree)
			// root, x (= y = z/x), x/g, z: identical subdirectories are stored once.
			if len(tree.Children) != 3 {
				t.Errorf("tree has %d children, want 3: %v", len(tree.Children), tree.Children)
			}
			// The hand-built encoding is the deterministic encoding, with
			// the root first and one-byte tags.
			if !bytes.Equal(raw, marshal(t, tree)) {
				t.Error("tree bytes differ from the deterministic marshaling of the tree")
			}
			if raw[0] != 0x0a {
				t.Errorf("tree starts with tag %#x", raw[0])
			}
			// The same contents yield the same tree, whatever the order of
			// creation on disk.
			root2 := t.TempDir()
			writeFile(t, root2, "out/b", []byte("b"), 0o644)
			for _, d := range []string{"out/z/x", "out/y", "out/x"} {
				writeFile(t, root2, d+"/g/h", []byte("same too"), 0o644)
				writeFile(t, root2, d+"/f", []byte("same"), 0o644)
			}
			res2, err := Collect(context.Background(), cas, fn, root2, &repb.Command{OutputPaths: []string{"out"}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if got := res2.ActionResult.OutputDirectories[0].TreeDigest; !proto_equal(got, od.TreeDigest) {
				t.Errorf("tree digest %v differs from %v", got, od.TreeDigest)
			}
		})
	}
}

func TestCollectLegacy(t *testing.T) {
	root := fixture(t)
	cas := newStore()
	cmd := &repb.Command{
		WorkingDirectory:  "build",
		OutputFiles:       []string{"data.txt", "missing", "shadowlink"},
		OutputDirectories: []string{"dirlink", "missing-dir", "tree"},
	}
	res, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ar := res.ActionResult
	if len(ar.OutputFiles) != 1 || ar.OutputFiles[0].Path != "data.txt" {
		t.Errorf("output files = %v", ar.OutputFiles)
	}
	if len(ar.OutputDirectories) != 1 || ar.OutputDirectories[0].Path != "tree" {
		t.Errorf("output directories = %v", ar.OutputDirectories)
	}
	if len(ar.OutputFileSymlinks) != 1 || ar.OutputFileSymlinks[0].Path != "shadowlink" || ar.OutputFileSymlinks[0].Target != "/etc/shadow" {
		t.Errorf("output file symlinks = %v", ar.OutputFileSymlinks)
	}
	if len(ar.OutputDirectorySymlinks) != 1 || ar.OutputDirectorySymlinks[0].Path != "dirlink" || ar.OutputDirectorySymlinks[0].Target != "tree" {
		t.Errorf("output directory symlinks = %v", ar.OutputDirectorySymlinks)
	}
	if len(ar.OutputSymlinks) != 0 {
		t.Errorf("output_symlinks set for legacy outputs: %v", ar.OutputSymlinks)
	}

	// output_paths wins over the legacy fields.
	cmd.OutputPaths = []string{"data.txt"}
	res, err = Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ar := res.ActionResult; len(ar.OutputFiles) != 1 || len(ar.OutputDirectories)+len(ar.OutputFileSymlinks)+len(ar.OutputDirectorySymlinks) != 0 {
		t.Errorf("with output_paths: %v", ar)
	}
}

func TestCollectLegacyKindMismatch(t *testing.T) {
	root := fixture(t)
	for name, cmd := range map[string]*repb.Command{
		"dir declared as file": {WorkingDirectory: "build", OutputFiles: []string{"tree"}},
		"file declared as dir": {WorkingDirectory: "build", OutputDirectories: []string{"data.txt"}},
	} {
		t.Run(name, func(t *testing.T) {
			cas := newStore()
			_, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
			if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("err = %v, want FAILED_PRECONDITION", err)
			}
			if !strings.Contains(err.Error(), "build/") {
				t.Errorf("error %q does not name the output", err)
			}
		})
	}
}

func TestCollectDotDotOutputs(t *testing.T) {
	root := t.TempDir()
	mkdir(t, root, "build")
	writeFile(t, root, "nix/store/abc-out/bin/hello", []byte("hello"), 0o555)
	writeFile(t, root, "nix/store/def-dev", []byte("dev"), 0o444)
	cas := newStore()
	cmd := &repb.Command{
		WorkingDirectory: "build",
		OutputPaths:      []string{"../nix/store/abc-out", "../nix/store/def-dev", "../nix/store/ghi-missing"},
	}
	res, err := Collect(context.Background(), cas, digest.BLAKE3, root, cmd, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ar := res.ActionResult
	if len(ar.OutputDirectories) != 1 || ar.OutputDirectories[0].Path != "../nix/store/abc-out" {
		t.Fatalf("output directories = %v", ar.OutputDirectories)
	}
	if len(ar.OutputFiles) != 1 || ar.OutputFiles[0].Path != "../nix/store/def-dev" {
		t.Fatalf("output files = %v", ar.OutputFiles)
	}
	tree, _ := getTree(t, cas, digest.BLAKE3, ar.OutputDirectories[0].TreeDigest)
	if len(tree.Children) != 1 || len(tree.Children[0].Files) != 1 || !tree.Children[0].Files[0].IsExecutable {
		t.Errorf("tree = %v", tree)
	}
}

func TestCollectRejectsInvalidPathsBeforeReading(t *testing.T) {
	root := fixture(t)
	for _, p := range []string{"../../x", "/abs", "a/../../../b", ""} {
		cas := newStore()
		cmd := &repb.Command{WorkingDirectory: "build", OutputPaths: []string{"data.txt", p}}
		_, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("output %q: err = %v, want INVALID_ARGUMENT", p, err)
		}
		if cas.findMissing != 0 || len(cas.uploaded()) != 0 {
			t.Errorf("output %q: the CAS was used before the paths were validated", p)
		}
	}
	_, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{WorkingDirectory: "../x", OutputPaths: []string{"y"}}, Options{})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("escaping working directory: err = %v", err)
	}
}

func TestCollectSymlinkedParent(t *testing.T) {
	for _, walk := range []bool{false, true} {
		name := "openat2"
		if walk {
			name = "walk"
		}
		t.Run(name, func(t *testing.T) {
			if walk {
				noOpenat2.Store(true)
				defer noOpenat2.Store(false)
			}
			root := t.TempDir()
			symlink(t, root, "build/link", "/etc")
			symlink(t, root, "nix", "/")
			writeFile(t, root, "build/file", []byte("f"), 0o644)
			for _, tc := range []struct{ out, bad string }{
				{"link/passwd", "build/link is a symlink"},
				{"link/ssl/certs", "build/link is a symlink"},
				{"../nix/store/x", "nix is a symlink"},
				{"file/x", "build/file is a regular file"},
			} {
				cas := newStore()
				cmd := &repb.Command{WorkingDirectory: "build", OutputPaths: []string{tc.out}}
				_, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
				if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.bad) {
					t.Errorf("output %s: err = %v, want FAILED_PRECONDITION naming %q", tc.out, err, tc.bad)
				}
				if len(cas.uploaded()) != 0 {
					t.Errorf("output %s: uploaded %v", tc.out, cas.uploaded())
				}
			}
		})
	}
}

// TestCollectWithoutOpenat2 runs a complete collection with the
// component-by-component walk.
func TestCollectWithoutOpenat2(t *testing.T) {
	noOpenat2.Store(true)
	defer noOpenat2.Store(false)
	root := fixture(t)
	writeFile(t, root, "build/big", pattern(3<<20, 7), 0o644)
	cas := newStore()
	cmd := &repb.Command{WorkingDirectory: "build", OutputPaths: []string{"big", "bin/tool", "missing/x", "tree"}}
	res, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.ActionResult.OutputFiles) != 2 || len(res.ActionResult.OutputDirectories) != 1 {
		t.Errorf("result = %v", res.ActionResult)
	}
	if got := get(t, cas, digest.SHA256, res.ActionResult.OutputFiles[0].Digest); !bytes.Equal(got, pattern(3<<20, 7)) {
		t.Error("big file contents differ")
	}
}

func TestCollectMissingOutputs(t *testing.T) {
	root := t.TempDir()
	mkdir(t, root, "build")
	cas := newStore()
	cmd := &repb.Command{
		WorkingDirectory:  "build",
		OutputFiles:       []string{"a", "b/c"},
		OutputDirectories: []string{"d", "../nix/store/e"},
	}
	res, err := Collect(context.Background(), cas, digest.SHA256, root, cmd, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ar := res.ActionResult
	if len(ar.OutputFiles)+len(ar.OutputDirectories)+len(ar.OutputFileSymlinks)+len(ar.OutputDirectorySymlinks)+len(ar.OutputSymlinks) != 0 {
		t.Errorf("result = %v, want no outputs", ar)
	}
	if cas.findMissing != 0 {
		t.Error("FindMissing called with nothing to upload")
	}
}

func TestCollectRejectsSpecialFiles(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root, "out/ok", []byte("ok"), 0o644)
	if err := syscall.Mkfifo(filepath.Join(root, "out/sub/fifo"), 0o644); err == nil {
		t.Fatal("mkfifo in a missing directory succeeded")
	}
	mkdir(t, root, "out/sub")
	if err := syscall.Mkfifo(filepath.Join(root, "out/sub/fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(root, "topfifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ out, msg string }{
		{"out", "out/sub/fifo: is a FIFO"},
		{"topfifo", "topfifo: is a FIFO"},
	} {
		_, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{tc.out}}, Options{})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("output %s: err = %v, want FAILED_PRECONDITION with %q", tc.out, err, tc.msg)
		}
	}
	// Legacy output_files naming a FIFO, too.
	_, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputFiles: []string{"topfifo"}}, Options{})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("output file FIFO: err = %v", err)
	}
}

func TestCollectRejectsNonUTF8Names(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root, "out/bad\xffname", []byte("x"), 0o644)
	_, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), `out/bad\xffname`) || !strings.Contains(err.Error(), "UTF-8") {
		t.Errorf("err = %v", err)
	}

	root = t.TempDir()
	symlink(t, root, "out/link", "target\xfe")
	_, err = Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "out/link") {
		t.Errorf("symlink target: err = %v", err)
	}
}

func TestCollectUnreadableByOwner(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	writeFile(t, root, "out/locked/secret", []byte("s"), 0o000)
	writeFile(t, root, "file", []byte("f"), 0o000)
	if err := os.Chmod(filepath.Join(root, "out/locked"), 0o000); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(root, "out/locked/secret"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	cas := newStore()
	res, err := Collect(context.Background(), cas, digest.SHA256, root, &repb.Command{OutputPaths: []string{"file", "out"}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.Files != 2 || len(res.ActionResult.OutputFiles) != 1 {
		t.Errorf("result = %v, stats %+v", res.ActionResult, res.Stats)
	}
	// Nothing was chmod'ed.
	if st, err := os.Stat(filepath.Join(root, "out/locked")); err != nil || st.Mode().Perm() != 0 {
		t.Errorf("locked dir mode = %v, %v", st.Mode(), err)
	}
}

func TestCollectFindsMissingBeforeUploading(t *testing.T) {
	ctx := context.Background()
	for _, fn := range functions {
		t.Run(fn.String(), func(t *testing.T) {
			root := t.TempDir()
			writeFile(t, root, "out/present", []byte("already there"), 0o644)
			writeFile(t, root, "out/new", []byte("new"), 0o644)
			writeFile(t, root, "out/copy", []byte("new"), 0o644) // same contents
			writeFile(t, root, "other", []byte("new"), 0o644)    // and again
			cas := newStore()
			present := digest.Compute(fn, []byte("already there"))
			if _, err := UploadBytes(ctx, cas, fn, []byte("already there")); err != nil {
				t.Fatal(err)
			}
			cas.reset()
			cmd := &repb.Command{OutputPaths: []string{"other", "out"}}
			res, err := Collect(ctx, cas, fn, root, cmd, Options{})
			if err != nil {
				t.Fatal(err)
			}
			up := cas.uploaded()
			if contains(up, present) {
				t.Error("a blob the CAS had was uploaded again")
			}
			newD := digest.Compute(fn, []byte("new"))
			n := 0
			for _, d := range up {
				if d == newD {
					n++
				}
			}
			if n != 1 {
				t.Errorf("blob with 3 copies uploaded %d times, want 1", n)
			}
			// new, Directory of out, Tree of out.
			if len(up) != 3 || res.Stats.UploadedBlobs != 3 || res.Stats.PresentBlobs != 1 {
				t.Errorf("uploaded %v, stats %+v", up, res.Stats)
			}
			if res.Stats.Files != 4 || res.Stats.Bytes != int64(len("already there")+3*len("new")) {
				t.Errorf("stats %+v", res.Stats)
			}

			// A second collection uploads nothing.
			cas.reset()
			res, err = Collect(ctx, cas, fn, root, cmd, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if up := cas.uploaded(); len(up) != 0 || res.Stats.UploadedBytes != 0 || res.Stats.PresentBlobs != 4 || cas.findMissing != 1 {
				t.Errorf("second collection uploaded %v, %d FindMissing calls, stats %+v", up, cas.findMissing, res.Stats)
			}
		})
	}
}

func TestCollectStreamsLargeFiles(t *testing.T) {
	for _, fn := range functions {
		t.Run(fn.String(), func(t *testing.T) {
			root := t.TempDir()
			big := pattern(20<<20, 1)
			writeFile(t, root, "big", big, 0o644)
			writeFile(t, root, "dir/big", pattern(2<<20, 2), 0o644)
			writeFile(t, root, "dir/small", []byte("small"), 0o644)
			cas := newStore()
			res, err := Collect(context.Background(), cas, fn, root, &repb.Command{OutputPaths: []string{"big", "dir"}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			bigD := digest.Compute(fn, big)
			if !contains(cas.puts, bigD) || contains(cas.batched, bigD) {
				t.Errorf("20 MiB file: streamed %v, batched %v", contains(cas.puts, bigD), contains(cas.batched, bigD))
			}
			if d := digest.Compute(fn, pattern(2<<20, 2)); !contains(cas.puts, d) {
				t.Error("2 MiB file in a directory was not streamed")
			}
			if d := digest.Compute(fn, []byte("small")); !contains(cas.batched, d) || contains(cas.puts, d) {
				t.Error("small file was not batched")
			}
			if got := get(t, cas, fn, res.ActionResult.OutputFiles[0].Digest); !bytes.Equal(got, big) {
				t.Error("20 MiB file contents differ")
			}
			if res.Stats.Bytes != 22<<20+5 || res.Stats.UploadedBytes < 22<<20+5 {
				t.Errorf("stats %+v", res.Stats)
			}
		})
	}
}

// TestCollectManySmallFiles goes beyond the memory budget for small
// files, so some are read again to be uploaded.
func TestCollectManySmallFiles(t *testing.T) {
	root := t.TempDir()
	const n = 100
	for i := range n {
		writeFile(t, root, filepath.Join("out", string(rune('a'+i%26))+strings.Repeat("x", i/26)), pattern(smallBlobSize-1-i, byte(i)), 0o644)
	}
	cas := newStore()
	res, err := Collect(context.Background(), cas, digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{Concurrency: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.Files != n || res.Stats.UploadedBlobs != n+2 {
		t.Errorf("stats %+v", res.Stats)
	}
	tree, _ := getTree(t, cas, digest.SHA256, res.ActionResult.OutputDirectories[0].TreeDigest)
	checkTree(t, cas, digest.SHA256, tree)
	if len(cas.puts) != 0 {
		t.Errorf("%d blobs streamed, want all batched", len(cas.puts))
	}
}

func TestCollectDepthLimit(t *testing.T) {
	root := t.TempDir()
	deep := strings.Repeat("d/", maxDepth+1)
	writeFile(t, root, "out/"+deep+"f", []byte("f"), 0o644)
	_, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "nested") {
		t.Errorf("err = %v", err)
	}
	// Just below the limit is fine.
	root = t.TempDir()
	writeFile(t, root, "out/"+strings.Repeat("d/", maxDepth-1)+"f", []byte("f"), 0o644)
	res, err := Collect(context.Background(), newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if err != nil || res.Stats.Files != 1 {
		t.Errorf("depth %d: %v", maxDepth-1, err)
	}
}

func TestCollectCanceled(t *testing.T) {
	root := t.TempDir()
	for i := range 50 {
		writeFile(t, root, filepath.Join("out", strings.Repeat("f", i+1)), []byte("x"), 0o644)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Collect(ctx, newStore(), digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
}

func TestCollectBadArguments(t *testing.T) {
	if _, err := Collect(context.Background(), newStore(), digest.Function(9), t.TempDir(), &repb.Command{}, Options{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad function: %v", err)
	}
	if _, err := Collect(context.Background(), newStore(), digest.SHA256, filepath.Join(t.TempDir(), "nope"), &repb.Command{OutputPaths: []string{"x"}}, Options{}); err == nil {
		t.Error("missing input root: no error")
	}
}

func TestUploadFile(t *testing.T) {
	ctx := context.Background()
	for _, fn := range functions {
		t.Run(fn.String(), func(t *testing.T) {
			dir := t.TempDir()
			cas := newStore()

			writeFile(t, dir, "empty", nil, 0o644)
			d, err := UploadFile(ctx, cas, fn, filepath.Join(dir, "empty"))
			if err != nil || d != digest.Empty(fn) {
				t.Errorf("empty: %v, %v", d, err)
			}
			if cas.findMissing != 0 || len(cas.uploaded()) != 0 {
				t.Error("empty file: the CAS was used")
			}

			for _, size := range []int{5, smallBlobSize - 1, smallBlobSize, 3 << 20} {
				data := pattern(size, byte(size))
				writeFile(t, dir, "f", data, 0o644)
				cas.reset()
				d, err := UploadFile(ctx, cas, fn, filepath.Join(dir, "f"))
				if err != nil || d != digest.Compute(fn, data) {
					t.Fatalf("size %d: %v, %v", size, d, err)
				}
				if got := get(t, cas, fn, d.Proto()); !bytes.Equal(got, data) {
					t.Errorf("size %d: contents differ", size)
				}
				cas.reset()
				if _, err := UploadFile(ctx, cas, fn, filepath.Join(dir, "f")); err != nil || len(cas.uploaded()) != 0 {
					t.Errorf("size %d: uploaded again (%v)", size, err)
				}
			}

			symlink(t, dir, "link", filepath.Join(dir, "f"))
			if _, err := UploadFile(ctx, cas, fn, filepath.Join(dir, "link")); status.Code(err) != codes.FailedPrecondition {
				t.Errorf("symlink: err = %v", err)
			}
			if _, err := UploadFile(ctx, cas, fn, dir); status.Code(err) != codes.FailedPrecondition {
				t.Errorf("directory: err = %v", err)
			}
			if _, err := UploadFile(ctx, cas, fn, filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("missing: err = %v", err)
			}
		})
	}
}

func TestUploadBytes(t *testing.T) {
	ctx := context.Background()
	for _, fn := range functions {
		cas := newStore()
		d, err := UploadBytes(ctx, cas, fn, nil)
		if err != nil || d != digest.Empty(fn) || cas.findMissing != 0 {
			t.Errorf("%s empty: %v, %v", fn, d, err)
		}
		d, err = UploadBytes(ctx, cas, fn, []byte("stdout"))
		if err != nil || d != digest.Compute(fn, []byte("stdout")) || string(get(t, cas, fn, d.Proto())) != "stdout" {
			t.Errorf("%s: %v, %v", fn, d, err)
		}
	}
}

// TestCollectLargeDirectoryMessage covers Directory and Tree messages of
// more than a batch blob, which are uploaded with Put from memory.
func TestCollectLargeDirectoryMessage(t *testing.T) {
	root := t.TempDir()
	mkdir(t, root, "out")
	for i := range 3500 {
		name := fmt.Sprintf("%04d-%s", i, strings.Repeat("n", 240))
		if err := os.WriteFile(filepath.Join(root, "out", name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cas := newStore()
	res, err := Collect(context.Background(), cas, digest.SHA256, root, &repb.Command{OutputPaths: []string{"out"}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	od := res.ActionResult.OutputDirectories[0]
	if od.TreeDigest.SizeBytes < smallBlobSize || od.RootDirectoryDigest.SizeBytes < smallBlobSize {
		t.Fatalf("tree %v, root %v: not large", od.TreeDigest, od.RootDirectoryDigest)
	}
	for _, pd := range []*repb.Digest{od.TreeDigest, od.RootDirectoryDigest} {
		d, _ := digest.FromProto(digest.SHA256, pd)
		if !contains(cas.puts, d) {
			t.Errorf("%s was not uploaded with Put", d)
		}
	}
	tree, _ := getTree(t, cas, digest.SHA256, od.TreeDigest)
	if len(tree.Root.Files) != 3500 || len(tree.Children) != 0 {
		t.Errorf("tree has %d files, %d children", len(tree.Root.Files), len(tree.Children))
	}
	if res.Stats.Files != 3500 || res.Stats.Bytes != 0 || res.Stats.UploadedBlobs != 2 {
		t.Errorf("stats %+v", res.Stats)
	}
}

func TestCollectUploadErrors(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root, "big", pattern(2<<20, 1), 0o644)
	writeFile(t, root, "small", []byte("small"), 0o644)
	cas := blobstore.NewMemory(blobstore.CAS, 1<<20) // too small for big
	_, err := Collect(context.Background(), cas, digest.SHA256, root, &repb.Command{OutputPaths: []string{"big", "small"}}, Options{})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "output big") {
		t.Errorf("err = %v, want RESOURCE_EXHAUSTED naming output big", err)
	}
}

// TestReopenChecksIdentity checks that a file replaced between hashing
// and uploading is not uploaded in its place.
func TestReopenChecksIdentity(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root, "dir/f", []byte("f"), 0o644)
	rfd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rfd)
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(root, "dir/f"), &st); err != nil {
		t.Fatal(err)
	}
	f := &file{rel: "dir/f", dev: st.Dev, ino: st.Ino, d: digest.Compute(digest.SHA256, []byte("f"))}
	data, err := readSmall(rfd, f, 1)
	if err != nil || string(data) != "f" {
		t.Fatalf("readSmall = %q, %v", data, err)
	}
	if _, err := readSmall(rfd, f, 2); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("size changed: err = %v", err)
	}
	writeFile(t, root, "dir/g", []byte("f"), 0o644)
	if err := os.Rename(filepath.Join(root, "dir/g"), filepath.Join(root, "dir/f")); err != nil {
		t.Fatal(err)
	}
	if _, err := readSmall(rfd, f, 1); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "replaced") {
		t.Errorf("replaced: err = %v", err)
	}
	if err := putLarge(context.Background(), newStore(), rfd, blob{d: f.d, file: f}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("replaced, large: err = %v", err)
	}
	if err := os.Remove(filepath.Join(root, "dir/f")); err != nil {
		t.Fatal(err)
	}
	symlink(t, root, "dir/f", "/etc/passwd")
	if _, err := readSmall(rfd, f, 1); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("replaced by a symlink: err = %v", err)
	}
}

// TestOpenat2Used checks that openat2 is used where the kernel has it, so
// that the walk is not the only path tested.
func TestOpenat2Used(t *testing.T) {
	root := t.TempDir()
	mkdir(t, root, "a/b")
	rfd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rfd)
	fd, err := unix.Openat2(rfd, "a/b", &unix.OpenHow{Flags: dirFlags, Resolve: resolveFlags})
	if err == unix.ENOSYS {
		t.Skip("no openat2")
	} else if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	fd, err = openDir(rfd, "a/b")
	if err != nil || noOpenat2.Load() {
		t.Fatalf("openDir: %v, noOpenat2 %v", err, noOpenat2.Load())
	}
	unix.Close(fd)
	if _, err := openDir(rfd, "a/missing/c"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("missing: err = %v", err)
	}
}
