package inputs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"tvixfarm/cas/digest"
)

func newLayers(t testing.TB, m *Materializer, max int64) *Layers {
	t.Helper()
	l, err := NewLayers(m, filepath.Join(t.TempDir(), "layers"), max)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// storeTree builds an input root like a Nix action's: build/, etc/ and
// nix/store with a directory, a file and a symlink store path.
func storeTree(t testing.TB, cas *store, tag string) (root, storeD digest.Digest) {
	t.Helper()
	bin := cas.dir(t, file("hello", cas.blob(t, "#!hello "+tag), true))
	pkg := cas.dir(t, subdir("bin", bin), file("README", cas.blob(t, "readme"), false))
	storeD = cas.dir(t,
		subdir("aaa-pkg-"+tag, pkg),
		file("bbb-script.sh", cas.blob(t, "echo "+tag), true),
		symlink("ccc-link", "aaa-pkg-"+tag),
	)
	nix := cas.dir(t, subdir("store", storeD))
	build := cas.dir(t, file("input.txt", cas.blob(t, "in"), false))
	root = cas.dir(t, subdir("build", build), subdir("nix", nix))
	return root, storeD
}

func TestLayersMaterialize(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	l := newLayers(t, m, 1<<30)
	root, _ := storeTree(t, cas, "1")

	dst := newDst(t)
	set, stats, err := l.Materialize(ctx, root, dst, "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Release()
	// The root has everything but the store's entries.
	if got, want := listTree(t, dst), []string{"build", "build/input.txt", "nix", "nix/store"}; !slices.Equal(got, want) {
		t.Errorf("input root = %q, want %q", got, want)
	}
	// One layer per store path, each holding just that entry.
	dirs := set.Dirs()
	if len(dirs) != 3 {
		t.Fatalf("layers = %q, want 3", dirs)
	}
	var all []string
	for _, d := range dirs {
		all = append(all, listTree(t, d)...)
	}
	slices.Sort(all)
	want := []string{"aaa-pkg-1", "aaa-pkg-1/README", "aaa-pkg-1/bin", "aaa-pkg-1/bin/hello", "bbb-script.sh", "ccc-link"}
	if !slices.Equal(all, want) {
		t.Errorf("layers hold %q, want %q", all, want)
	}
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, "bbb-script.sh")); err == nil && fi.Mode().Perm() != 0o555 {
			t.Errorf("script mode %v, want 0555", fi.Mode())
		}
		if target, err := os.Readlink(filepath.Join(d, "ccc-link")); err == nil && target != "aaa-pkg-1" {
			t.Errorf("symlink target %q", target)
		}
	}
	if stats.Files != 4 || stats.Symlinks != 1 {
		t.Errorf("stats = %+v, want 4 files (1 outside the store) and 1 symlink", stats)
	}

	// A second input root sharing two store paths reuses their layers.
	root2 := cas.dir(t, subdir("nix", cas.dir(t, subdir("store", cas.dir(t,
		subdir("aaa-pkg-1", cas.dir(t, subdir("bin", cas.dir(t, file("hello", cas.blob(t, "#!hello 1"), true))), file("README", cas.blob(t, "readme"), false))),
		file("bbb-script.sh", cas.blob(t, "echo 1"), true),
		file("ddd-new", cas.blob(t, "new"), false),
	)))))
	gets := cas.totalGets()
	set2, _, err := l.Materialize(ctx, root2, newDst(t), "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer set2.Release()
	shared := 0
	for _, d := range set2.Dirs() {
		if slices.Contains(dirs, d) {
			shared++
		}
	}
	if shared != 2 {
		t.Errorf("%d layers shared with the first root, want 2", shared)
	}
	st := l.Stats()
	if st.Layers != 4 || st.Hits != 2 {
		t.Errorf("stats %+v, want 4 layers and 2 hits", st)
	}
	// Only the new file and the new Directories were fetched.
	if n := cas.totalGets() - gets; n > 4 {
		t.Errorf("%d CAS reads for one new store path", n)
	}
}

// A tree without the split directory materialises as a whole.
func TestLayersNoSplit(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	l := newLayers(t, m, 1<<30)
	root := cas.dir(t, subdir("build", cas.dir(t, file("x", cas.blob(t, "x"), false))))
	dst := newDst(t)
	set, _, err := l.Materialize(context.Background(), root, dst, "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	set.Release()
	if len(set.Dirs()) != 0 || !slices.Equal(listTree(t, dst), []string{"build", "build/x"}) {
		t.Errorf("layers %q, tree %q", set.Dirs(), listTree(t, dst))
	}
}

// The store's Directory may also appear elsewhere in the tree: there it
// is materialised in full.
func TestLayersSplitDigestElsewhere(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	l := newLayers(t, m, 1<<30)
	_, storeD := storeTree(t, cas, "1")
	root := cas.dir(t, subdir("copy", storeD), subdir("nix", cas.dir(t, subdir("store", storeD))), subdir("z", storeD))
	dst := newDst(t)
	set, _, err := l.Materialize(context.Background(), root, dst, "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Release()
	for _, p := range []string{"copy/aaa-pkg-1/bin/hello", "z/bbb-script.sh", "z/ccc-link"} {
		if _, err := os.Lstat(filepath.Join(dst, p)); err != nil {
			t.Error(err)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(dst, "nix/store")); len(ents) != 0 {
		t.Errorf("nix/store has %d entries in the root, want 0", len(ents))
	}
	if len(set.Dirs()) != 3 {
		t.Errorf("%d layers", len(set.Dirs()))
	}
}

func TestLayersMissing(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	l := newLayers(t, m, 1<<30)
	gone := digest.Compute(digest.SHA256, []byte("not uploaded"))
	pkg := cas.dir(t, subdir("bin", cas.dir(t, file("tool", gone, true))))
	root := cas.dir(t, subdir("nix", cas.dir(t, subdir("store", cas.dir(t, subdir("aaa-pkg", pkg), file("bbb-file", gone, false))))))
	set, _, err := l.Materialize(context.Background(), root, newDst(t), "nix/store", MaterializeOptions{})
	var missing *MissingBlobsError
	if !errors.As(err, &missing) {
		t.Fatalf("err = %v, want MissingBlobsError", err)
	}
	set.Release()
	if len(missing.Digests) != 1 || (missing.Paths[0] != "nix/store/aaa-pkg/bin/tool" && missing.Paths[0] != "nix/store/bbb-file") {
		t.Errorf("missing %v at %q", missing.Digests, missing.Paths)
	}
	if st := l.Stats(); st.Layers != 0 {
		t.Errorf("failed layers are kept: %+v", st)
	}
	// Once uploaded, the same root works.
	cas.blob(t, "not uploaded")
	set, _, err = l.Materialize(context.Background(), root, newDst(t), "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	set.Release()
}

// Concurrent actions needing the same store paths create each layer once.
func TestLayersConcurrent(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	l := newLayers(t, m, 1<<30)
	root, _ := storeTree(t, cas, "c")
	var wg sync.WaitGroup
	sets := make([][]string, 8)
	for i := range sets {
		wg.Go(func() {
			set, _, err := l.Materialize(context.Background(), root, newDst(t), "nix/store", MaterializeOptions{})
			if err != nil {
				t.Error(err)
				return
			}
			sets[i] = set.Dirs()
			set.Release()
		})
	}
	wg.Wait()
	for _, s := range sets[1:] {
		if !slices.Equal(s, sets[0]) {
			t.Errorf("layers differ: %q and %q", s, sets[0])
		}
	}
	if st := l.Stats(); st.Layers != 3 || st.Hits+st.Misses != 24 {
		t.Errorf("stats %+v, want 3 layers for 24 uses", st)
	}
}

// Beyond the bound, unused layers are evicted, least recently used first;
// layers in use never are.
func TestLayersEviction(t *testing.T) {
	ctx := context.Background()
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<30, cas), 1<<20)
	l := newLayers(t, m, 3*(4096+1000)) // room for about 3 one-file layers
	rootOf := func(i int) digest.Digest {
		f := cas.blob(t, fmt.Sprintf("%01000d", i))
		return cas.dir(t, subdir("nix", cas.dir(t, subdir("store", cas.dir(t, file(fmt.Sprintf("p%d", i), f, false))))))
	}
	held, _, err := l.Materialize(ctx, rootOf(0), newDst(t), "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		set, _, err := l.Materialize(ctx, rootOf(i), newDst(t), "nix/store", MaterializeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		set.Release()
	}
	if _, err := os.Stat(filepath.Join(held.Dirs()[0], "p0")); err != nil {
		t.Errorf("a layer in use was evicted: %v", err)
	}
	st := l.Stats()
	if st.Evictions == 0 || st.Layers > 3 {
		t.Errorf("stats %+v: want evictions down to 3 layers", st)
	}
	held.Release()
}

// Layers left by an earlier process are removed, not trusted.
func TestLayersRestart(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	m := NewMaterializer(newCache(t, 1<<20, cas), 1<<20)
	dir := filepath.Join(t.TempDir(), "layers")
	l, err := NewLayers(m, dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := storeTree(t, cas, "r")
	set, _, err := l.Materialize(context.Background(), root, newDst(t), "nix/store", MaterializeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	old := set.Dirs()
	l.Close()
	l2, err := NewLayers(m, dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	l2.Close() // waits for the removal
	for _, d := range old {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("old layer %s survived a restart: %v", d, err)
		}
	}
	if olds, _ := filepath.Glob(dir + ".old-*"); len(olds) != 0 {
		t.Errorf("left behind: %q", olds)
	}
}
