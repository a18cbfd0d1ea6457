package inputs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

func TestMaterialize(t *testing.T) {
	for _, fn := range digest.Functions {
		t.Run(fn.String(), func(t *testing.T) {
			testMaterialize(t, fn)
		})
	}
}

func testMaterialize(t *testing.T, fn digest.Function) {
	ctx := context.Background()
	cas := newStore(t, fn)
	hello := cas.blob(t, "hello\n")
	script := cas.blob(t, "#!/bin/sh\necho hi\n")
	deep := cas.blob(t, "deep")
	empty := digest.Empty(fn) // deliberately not uploaded, like the empty Directory
	emptyDir, _ := encodeDir(t, fn)
	deepDir := cas.dir(t, file("x", deep, false))
	sub := cas.dir(t,
		file("copy.txt", hello, false),
		file("hello-exec", hello, true),
		file("empty-exec", empty, true),
		subdir("deep", deepDir),
		subdir("emptydir", emptyDir),
	)
	root := cas.dir(t,
		file("a.txt", hello, false),
		file("empty", empty, false),
		file("run.sh", script, true),
		subdir("sub", sub),
		subdir("sub2", sub), // the same subtree twice
		symlink("rel", "a.txt"),
		symlink("shadow", "/etc/shadow"),
		symlink("dangling", "../../nowhere"),
	)

	c := newCache(t, 1<<20, cas)
	m := NewMaterializer(c, 1<<20)
	dst := newDst(t)
	// One goroutine, so that which uses of a blob fetch it is certain.
	stats, err := m.Materialize(ctx, root, dst, MaterializeOptions{Parallelism: 1})
	if err != nil {
		t.Fatal(err)
	}
	want := MaterializeStats{
		Directories:        6, // sub, sub2, and deep and emptydir in each
		Files:              3 + 2*4,
		Symlinks:           3,
		Bytes:              6 + 18 + 2*(6+6+4),
		FilesFetched:       6, // 5 blobs, hello in two modes
		FilesCached:        5,
		DirectoriesFetched: 4,
	}
	stats.TreeDuration = 0
	if stats != want {
		t.Errorf("stats = %+v, want %+v", stats, want)
	}

	checkFile := func(rel, data string, mode fs.FileMode) {
		t.Helper()
		p := filepath.Join(dst, rel)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != mode {
			t.Errorf("%s: mode %v, want %v", rel, fi.Mode(), mode)
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != data {
			t.Errorf("%s: contents %q, want %q", rel, got, data)
		}
	}
	for _, s := range []string{"sub", "sub2"} {
		checkFile(s+"/copy.txt", "hello\n", 0o444)
		checkFile(s+"/hello-exec", "hello\n", 0o555)
		checkFile(s+"/empty-exec", "", 0o555)
		checkFile(s+"/deep/x", "deep", 0o444)
		for _, d := range []string{s, s + "/deep", s + "/emptydir"} {
			fi, err := os.Lstat(filepath.Join(dst, d))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode() != fs.ModeDir|0o755 {
				t.Errorf("%s: mode %v, want drwxr-xr-x", d, fi.Mode())
			}
		}
	}
	checkFile("a.txt", "hello\n", 0o444)
	checkFile("empty", "", 0o444)
	checkFile("run.sh", "#!/bin/sh\necho hi\n", 0o555)

	same := func(a, b string) bool {
		t.Helper()
		fa, err := os.Lstat(filepath.Join(dst, a))
		if err != nil {
			t.Fatal(err)
		}
		fb, err := os.Lstat(filepath.Join(dst, b))
		if err != nil {
			t.Fatal(err)
		}
		return os.SameFile(fa, fb)
	}
	if !same("a.txt", "sub/copy.txt") || !same("sub/copy.txt", "sub2/copy.txt") {
		t.Error("a shared blob is not one inode")
	}
	if same("a.txt", "sub/hello-exec") {
		t.Error("executable and non-executable variants share an inode")
	}

	for name, target := range map[string]string{"rel": "a.txt", "shadow": "/etc/shadow", "dangling": "../../nowhere"} {
		p := filepath.Join(dst, name)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != fs.ModeSymlink {
			t.Errorf("%s: mode %v, want a symlink", name, fi.Mode())
		}
		if got, err := os.Readlink(p); err != nil || got != target {
			t.Errorf("%s: target %q (%v), want %q", name, got, err, target)
		}
	}

	// A second action with the same input root hits both caches.
	gets := cas.totalGets()
	dst2 := newDst(t)
	stats, err = m.Materialize(ctx, root, dst2, MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if stats.FilesCached != want.Files || stats.FilesFetched != 0 || stats.DirectoriesFetched != 0 {
		t.Errorf("second run: stats = %+v, want everything cached", stats)
	}
	if n := cas.totalGets(); n != gets {
		t.Errorf("second run made %d Gets", n-gets)
	}
	if !slices.Equal(listTree(t, dst), listTree(t, dst2)) {
		t.Errorf("second run created %v, first %v", listTree(t, dst2), listTree(t, dst))
	}
	if cs := c.Stats(); cs.Files != 6 || cs.Bytes != 6+6+18+4 || cs.Misses != 6 || cs.Hits != 5+11 {
		t.Errorf("cache stats = %+v", cs)
	}
}

func TestMaterializeMerge(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	x := cas.blob(t, "x")
	storePath := cas.dir(t, subdir("bin", cas.dir(t, file("x", x, true))))
	root := cas.dir(t,
		subdir("build", cas.dir(t, file("src", x, false))),
		subdir("nix", cas.dir(t, subdir("store", cas.dir(t, subdir("abc-foo", storePath))))),
		subdir("tmp", cas.dir(t)),
	)
	dst := newDst(t)
	for _, d := range []string{"build", "nix/store", "tmp", "proc", "dev"} {
		if err := os.MkdirAll(filepath.Join(dst, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dst, "tmp/keep"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	if _, err := m.Materialize(ctx, root, dst, MaterializeOptions{}); err != nil {
		t.Fatal(err)
	}
	want := []string{"build", "build/src", "dev", "nix", "nix/store", "nix/store/abc-foo", "nix/store/abc-foo/bin", "nix/store/abc-foo/bin/x", "proc", "tmp", "tmp/keep"}
	if got := listTree(t, dst); !slices.Equal(got, want) {
		t.Errorf("tree = %v, want %v", got, want)
	}
	// Existing directories are merged into, not changed.
	if fi, err := os.Stat(filepath.Join(dst, "nix/store")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("nix/store: %v, %v; want it left at 0700", fi.Mode(), err)
	}
}

func TestMaterializeExisting(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	x := cas.blob(t, "x")
	root := cas.dir(t,
		subdir("dir", cas.dir(t, file("f", x, false))),
		file("f", x, false),
		symlink("l", "f"),
	)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	outside := t.TempDir()
	for name, prepare := range map[string]func(dst string) error{
		"file where a directory goes": func(dst string) error {
			return os.WriteFile(filepath.Join(dst, "dir"), nil, 0o644)
		},
		"symlink where a directory goes": func(dst string) error {
			return os.Symlink(outside, filepath.Join(dst, "dir"))
		},
		"file where a file goes": func(dst string) error {
			return os.WriteFile(filepath.Join(dst, "f"), []byte("old"), 0o644)
		},
		"directory where a file goes": func(dst string) error {
			return os.Mkdir(filepath.Join(dst, "f"), 0o755)
		},
		"file where a symlink goes": func(dst string) error {
			return os.WriteFile(filepath.Join(dst, "l"), nil, 0o644)
		},
	} {
		t.Run(name, func(t *testing.T) {
			dst := newDst(t)
			if err := prepare(dst); err != nil {
				t.Fatal(err)
			}
			_, err := m.Materialize(ctx, root, dst, MaterializeOptions{})
			if err == nil {
				t.Fatal("Materialize succeeded")
			}
			if !errors.Is(err, fs.ErrExist) && !strings.Contains(err.Error(), "not a directory") {
				t.Errorf("error %v does not say the path exists", err)
			}
			if got := listTree(t, outside); len(got) != 0 {
				t.Errorf("created %v outside the input root", got)
			}
		})
	}
	t.Run("dst is a symlink", func(t *testing.T) {
		dst := filepath.Join(t.TempDir(), "root")
		if err := os.Symlink(outside, dst); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Materialize(ctx, root, dst, MaterializeOptions{}); err == nil {
			t.Fatal("Materialize succeeded")
		}
		if got := listTree(t, outside); len(got) != 0 {
			t.Errorf("created %v outside the input root", got)
		}
	})
}

func TestMaterializeInvalid(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	x := cas.blob(t, "x")
	ok := cas.dir(t, file("x", x, false))
	for name, nodes := range map[string][]any{
		"dotdot file":        {file("..", x, false)},
		"dotdot directory":   {subdir("..", ok)},
		"dot directory":      {subdir(".", ok)},
		"slash":              {file("a/b", x, false)},
		"slash symlink":      {symlink("../escape", "x")},
		"empty":              {file("", x, false)},
		"NUL":                {file("a\x00b", x, false)},
		"duplicate files":    {file("a", x, false), file("a", x, true)},
		"file and directory": {file("a", x, false), subdir("a", ok)},
		"dir and symlink":    {subdir("a", ok), symlink("a", "x")},
		"empty target":       {symlink("a", "")},
		"NUL target":         {symlink("a", "x\x00")},
		"missing digest":     {fileWithDigest(nil)},
		"bad hash":           {fileWithDigest(&repb.Digest{Hash: strings.ToUpper(x.Hex()), SizeBytes: x.Size()})},
		"negative size":      {fileWithDigest(&repb.Digest{Hash: x.Hex(), SizeBytes: -1})},
	} {
		t.Run(name, func(t *testing.T) {
			// The bad entry sits two levels deep, after valid siblings,
			// so that nothing is created before it is found.
			bad := cas.dir(t, nodes...)
			root := cas.dir(t, file("first", x, false), subdir("ok", ok), subdir("z", cas.dir(t, subdir("bad", bad))))
			parent := t.TempDir()
			dst := filepath.Join(parent, "root")
			if err := os.Mkdir(dst, 0o755); err != nil {
				t.Fatal(err)
			}
			m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
			_, err := m.Materialize(ctx, root, dst, MaterializeOptions{})
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error %v, want INVALID_ARGUMENT", err)
			}
			if got := listTree(t, parent); !slices.Equal(got, []string{"root"}) {
				t.Errorf("created %v", got)
			}
		})
	}
}

func TestMaterializeTooLarge(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	// 30 Directory messages, 2^30 paths.
	d := cas.dir(t, file("x", cas.blob(t, "x"), false))
	for range 30 {
		d = cas.dir(t, subdir("a", d), subdir("b", d))
	}
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	dst := newDst(t)
	_, err := m.Materialize(context.Background(), d, dst, MaterializeOptions{})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "entries") {
		t.Fatalf("error %v, want INVALID_ARGUMENT for too many entries", err)
	}
	if got := listTree(t, dst); len(got) != 0 {
		t.Errorf("created %d paths", len(got))
	}
}

func fileWithDigest(d *repb.Digest) *repb.FileNode {
	return &repb.FileNode{Name: "a", Digest: d}
}

func TestMaterializeMissing(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.BLAKE3)
	x := cas.blob(t, "x")
	gone1 := digest.Compute(digest.BLAKE3, []byte("not uploaded 1"))
	gone2 := digest.Compute(digest.BLAKE3, []byte("not uploaded 2"))
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)

	t.Run("files", func(t *testing.T) {
		root := cas.dir(t,
			file("a", x, false),
			subdir("d", cas.dir(t, file("b", gone1, false), file("c", gone2, true))),
			file("e", gone1, false),
		)
		_, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{})
		var me *MissingBlobsError
		if !errors.As(err, &me) {
			t.Fatalf("error %v (%T), want a *MissingBlobsError", err, err)
		}
		paths := make(map[digest.Digest]string)
		for i, d := range me.Digests {
			paths[d] = me.Paths[i]
		}
		if len(me.Digests) != 2 || paths[gone2] != "d/c" || (paths[gone1] != "d/b" && paths[gone1] != "e") {
			t.Errorf("missing %v at %v, want %v at d/b or e and %v at d/c", me.Digests, me.Paths, gone1, gone2)
		}
		for _, d := range []digest.Digest{gone1, gone2} {
			if !strings.Contains(err.Error(), d.String()) {
				t.Errorf("error %q does not name %s", err, d)
			}
		}
		if !strings.Contains(err.Error(), "d/c") {
			t.Errorf("error %q does not name the path d/c", err)
		}
		checkMissingStatus(t, err, gone1, gone2)
	})
	t.Run("directory", func(t *testing.T) {
		goneDir, _ := encodeDir(t, digest.BLAKE3, file("y", x, false))
		root := cas.dir(t, subdir("d", cas.dir(t, subdir("sub", goneDir))))
		_, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{})
		var me *MissingBlobsError
		if !errors.As(err, &me) || !slices.Equal(me.Digests, []digest.Digest{goneDir}) || !slices.Equal(me.Paths, []string{"d/sub"}) {
			t.Fatalf("error %v, want the missing directory d/sub", err)
		}
		checkMissingStatus(t, fmt.Errorf("wrapped: %w", err), goneDir)
	})
	t.Run("root", func(t *testing.T) {
		root, _ := encodeDir(t, digest.BLAKE3, file("y", x, false))
		_, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{})
		var me *MissingBlobsError
		if !errors.As(err, &me) || !slices.Equal(me.Digests, []digest.Digest{root}) || !slices.Equal(me.Paths, []string{"."}) {
			t.Fatalf("error %v, want the missing root", err)
		}
	})
}

func checkMissingStatus(t *testing.T, err error, ds ...digest.Digest) {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != codes.FailedPrecondition {
		t.Errorf("code %v, want FAILED_PRECONDITION", st.Code())
	}
	var subjects []string
	for _, det := range st.Details() {
		if pf, ok := det.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.Violations {
				if v.Type != "MISSING" {
					t.Errorf("violation type %q, want MISSING", v.Type)
				}
				subjects = append(subjects, v.Subject)
			}
		}
	}
	var want []string
	for _, d := range ds {
		want = append(want, "blobs/"+d.String())
	}
	slices.Sort(subjects)
	slices.Sort(want)
	if !slices.Equal(subjects, want) {
		t.Errorf("violation subjects %v, want %v", subjects, want)
	}
	if len(ds) > 0 && ds[0].Function() == digest.BLAKE3 && !strings.HasPrefix(want[0], "blobs/blake3/") {
		t.Errorf("subject %q lacks the digest function", want[0])
	}
}

func TestMaterializeCorrupt(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	good := cas.blob(t, "good")
	bad := cas.blob(t, "bad blob")
	cas.corrupt[bad] = true
	c := newCache(t, 1<<20, cas)
	m := NewMaterializer(c, 1<<20)

	root := cas.dir(t, file("good", good, false), file("bad", bad, false))
	_, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{Parallelism: 1})
	if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), bad.String()) {
		t.Fatalf("error %v, want DATA_LOSS naming %s", err, bad)
	}
	if _, err := os.Lstat(c.path(cacheKey{d: bad})); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("corrupt blob is in the cache: %v", err)
	}
	if got := listTree(t, c.tmpDir()); len(got) != 0 {
		t.Errorf("temporary files left: %v", got)
	}
	if s := c.Stats(); s.Files > 1 {
		t.Errorf("cache stats %+v count the corrupt blob", s)
	}

	// Once the CAS serves the right bytes, the blob is fetched again.
	cas.mu.Lock()
	cas.corrupt[bad] = false
	cas.mu.Unlock()
	if _, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{}); err != nil {
		t.Fatal(err)
	}

	t.Run("directory", func(t *testing.T) {
		sub := cas.dir(t, file("good", good, false))
		cas.mu.Lock()
		cas.corrupt[sub] = true
		cas.mu.Unlock()
		root := cas.dir(t, subdir("sub", sub))
		_, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{})
		if status.Code(err) != codes.DataLoss {
			t.Fatalf("error %v, want DATA_LOSS", err)
		}
		if m.cached(sub) != nil {
			t.Error("corrupt directory is cached")
		}
	})
}

func TestMaterializeConcurrent(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	var nodes []any
	for i := range 5 {
		var files []any
		for j := range 20 {
			files = append(files, file(fmt.Sprintf("f%d", j), cas.blob(t, fmt.Sprintf("blob %d %d", i, j)), j%3 == 0))
		}
		nodes = append(nodes, subdir(fmt.Sprintf("d%d", i), cas.dir(t, files...)))
	}
	root := cas.dir(t, nodes...)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		dst := newDst(t)
		wg.Go(func() {
			_, errs[i] = m.Materialize(ctx, root, dst, MaterializeOptions{})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	cas.mu.Lock()
	defer cas.mu.Unlock()
	if len(cas.gets) != 5*20+5+1 {
		t.Errorf("fetched %d blobs, want %d", len(cas.gets), 5*20+5+1)
	}
	for d, n := range cas.gets {
		if n != 1 {
			t.Errorf("blob %s fetched %d times", d, n)
		}
	}
}

func TestMaterializeCanceled(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	root := cas.dir(t, file("x", cas.blob(t, "x"), false))
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.Materialize(ctx, root, newDst(t), MaterializeOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

func TestTreeCacheBounded(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	x := cas.blob(t, "x")
	var ds []digest.Digest
	for i := range 10 {
		ds = append(ds, cas.dir(t, file(fmt.Sprintf("file-%d", i), x, false)))
	}
	m := NewMaterializer(newCache(t, 1<<20, cas), 3*ds[0].Size())
	for _, d := range ds {
		if _, err := m.Materialize(ctx, d, newDst(t), MaterializeOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	m.mu.Lock()
	n, size := len(m.dirs), m.size
	m.mu.Unlock()
	if n != 3 || size != 3*ds[0].Size() {
		t.Errorf("tree cache holds %d directories of %d bytes, want 3", n, size)
	}
	for _, d := range ds[7:] {
		if m.cached(d) == nil {
			t.Errorf("recent directory %s evicted", d)
		}
	}
}

// TestMaterializePlace checks MaterializeOptions.Place: files it names are
// private copies with its mode and owner, or links to its LinkTo (a copy
// if that cannot be linked); the cache's files keep their mode, owner and
// contents; Layers do not ask it about their layers' files.
func TestMaterializePlace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	hello := cas.blob(t, "hello\n")
	other := cas.blob(t, "other\n")
	root := cas.dir(t,
		subdir("build", cas.dir(t, file(".attr-x", hello, false), file("tool", hello, true), subdir("sub", cas.dir(t, file("f", hello, false))))),
		subdir("etc", cas.dir(t, file("hosts", hello, false), file("passwd", hello, false), file("group", other, false))),
		subdir("nix", cas.dir(t, subdir("store", cas.dir(t, subdir("aaa-pkg", cas.dir(t, file("f", hello, false))))))),
		file("top", hello, false),
	)
	shared := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(shared, []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var asked []string
	var mu sync.Mutex
	place := func(rel string, d digest.Digest, executable bool) *Placement {
		mu.Lock()
		asked = append(asked, rel)
		mu.Unlock()
		switch {
		case strings.HasPrefix(rel, "build/"):
			mode := fs.FileMode(0o644)
			if executable {
				mode = 0o755
			}
			return &Placement{Mode: mode, UID: 4242, GID: 4343}
		case rel == "etc/hosts":
			return &Placement{LinkTo: shared, Mode: 0o644}
		case rel == "etc/passwd":
			return &Placement{LinkTo: filepath.Join(t.TempDir(), "missing"), Mode: 0o644} // falls back to a copy
		}
		return nil
	}
	c := newCache(t, 1<<20, cas)
	m := NewMaterializer(c, 1<<20)
	l := newLayers(t, m, 1<<30)
	for _, layered := range []bool{false, true} {
		asked = nil
		dst := newDst(t)
		opts := MaterializeOptions{Place: place}
		if layered {
			set, _, err := l.Materialize(ctx, root, dst, "nix/store", opts)
			if err != nil {
				t.Fatal(err)
			}
			defer set.Release()
		} else if _, err := m.Materialize(ctx, root, dst, opts); err != nil {
			t.Fatal(err)
		}
		slices.Sort(asked)
		want := []string{"build/.attr-x", "build/sub/f", "build/tool", "etc/group", "etc/hosts", "etc/passwd", "top"}
		if !layered {
			want = slices.Insert(want, 6, "nix/store/aaa-pkg/f")
		}
		if !slices.Equal(asked, want) {
			t.Errorf("layered %v: Place asked about %q, want %q", layered, asked, want)
		}
		check := func(rel string, mode fs.FileMode, uid, gid uint32, links uint64) {
			t.Helper()
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(dst, rel), &st); err != nil {
				t.Fatal(err)
			}
			got := fs.FileMode(st.Mode).Perm()
			if got != mode || st.Uid != uid || st.Gid != gid || (links > 0) != (st.Nlink > 1) {
				t.Errorf("layered %v: %s: mode %v owner %d:%d links %d, want mode %v owner %d:%d shared %v",
					layered, rel, got, st.Uid, st.Gid, st.Nlink, mode, uid, gid, links > 0)
			}
			if data, err := os.ReadFile(filepath.Join(dst, rel)); err != nil || len(data) == 0 {
				t.Errorf("%s: %q %v", rel, data, err)
			}
		}
		check("build/.attr-x", 0o644, 4242, 4343, 0)
		check("build/sub/f", 0o644, 4242, 4343, 0)
		check("build/tool", 0o755, 4242, 4343, 0)
		check("etc/hosts", 0o644, 0, 0, 1)  // the shared file
		check("etc/passwd", 0o644, 0, 0, 0) // a copy
		check("etc/group", 0o444, 0, 0, 1)  // the cache's
		check("top", 0o444, 0, 0, 1)
		if err := os.WriteFile(filepath.Join(dst, "build/.attr-x"), []byte("changed\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The cache is unchanged: a plain materialisation links its files.
	dst := newDst(t)
	if _, err := m.Materialize(ctx, root, dst, MaterializeOptions{}); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(dst, "build/.attr-x")); string(data) != "hello\n" {
		t.Errorf("the cache's file changed: %q", data)
	}
	if fi, err := os.Stat(filepath.Join(dst, "build/.attr-x")); err != nil || fi.Mode().Perm() != 0o444 {
		t.Errorf("the cache's file mode: %v %v", fi.Mode(), err)
	}
}
