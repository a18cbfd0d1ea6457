package inputs

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

func mustLink(t *testing.T, c *Cache, d digest.Digest, executable bool, dst string) {
	t.Helper()
	if err := c.Link(context.Background(), d, executable, dst); err != nil {
		t.Fatal(err)
	}
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err := os.Lstat(a)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := os.Lstat(b)
	if err != nil {
		t.Fatal(err)
	}
	return os.SameFile(fa, fb)
}

func checkContents(t *testing.T, path, want string, mode fs.FileMode) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != mode {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode(), mode)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("%s: contents %q, want %q", path, got, want)
	}
}

func TestCacheEviction(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	a, b := cas.blob(t, "aaaaaaaaaa"), cas.blob(t, "bbbbbbbbbb")
	c2, d := cas.blob(t, "cccccccccc"), cas.blob(t, "dddddddddd")
	c := newCache(t, 30, cas)
	out := t.TempDir()
	link := func(x digest.Digest, name string) string {
		t.Helper()
		p := filepath.Join(out, name)
		mustLink(t, c, x, false, p)
		return p
	}
	link(a, "a1")
	b1 := link(b, "b1")
	link(c2, "c1")
	link(a, "a2") // a is now more recently used than b
	link(d, "d1") // 40 bytes: b goes
	for x, want := range map[digest.Digest]bool{a: true, b: false, c2: true, d: true} {
		_, err := os.Lstat(c.path(cacheKey{d: x}))
		if got := err == nil; got != want {
			t.Errorf("%s in cache: %v, want %v (%v)", x, got, want, err)
		}
	}
	if s := c.Stats(); s.Files != 3 || s.Bytes != 30 || s.Evictions != 1 || s.Hits != 1 || s.Misses != 4 {
		t.Errorf("stats = %+v", s)
	}
	// The link made before the eviction still holds the inode.
	checkContents(t, b1, "bbbbbbbbbb", 0o444)
	link(b, "b2")
	if n := cas.getCount(b); n != 2 {
		t.Errorf("b fetched %d times, want 2", n)
	}
	if sameFile(t, b1, filepath.Join(out, "b2")) {
		t.Error("refetched blob shares the evicted inode")
	}
	// c was least recently used.
	if _, err := os.Lstat(c.path(cacheKey{d: c2})); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("c not evicted: %v", err)
	}
}

func TestCacheBlobLargerThanCache(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	big := cas.blob(t, strings.Repeat("x", 100))
	c := newCache(t, 10, cas)
	p := filepath.Join(t.TempDir(), "big")
	mustLink(t, c, big, true, p)
	checkContents(t, p, strings.Repeat("x", 100), 0o555)
	if s := c.Stats(); s.Files != 0 || s.Bytes != 0 {
		t.Errorf("stats = %+v, want the blob evicted after use", s)
	}
}

func TestCacheLinkFallback(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMLINK, syscall.EXDEV} {
		t.Run(errno.Error(), func(t *testing.T) {
			cas := newStore(t, digest.BLAKE3)
			x := cas.blob(t, "contents")
			c := newCache(t, 1<<20, cas)
			out := t.TempDir()
			first := filepath.Join(out, "first")
			mustLink(t, c, x, true, first)

			linkFunc = func(oldname, newname string) error {
				return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: errno}
			}
			defer func() { linkFunc = os.Link }()
			dst := filepath.Join(out, "copy")
			mustLink(t, c, x, true, dst)
			checkContents(t, dst, "contents", 0o555)
			cached := c.path(cacheKey{d: x, executable: true})
			if sameFile(t, dst, cached) || sameFile(t, dst, first) {
				t.Error("the copy shares an inode")
			}
			checkContents(t, cached, "contents", 0o555)
			if n := cas.getCount(x); n != 1 {
				t.Errorf("fetched %d times, want 1", n)
			}
			if got := listTree(t, c.tmpDir()); len(got) != 0 {
				t.Errorf("temporary files left: %v", got)
			}
		})
	}

	t.Run("EMLINK replaces the cached inode", func(t *testing.T) {
		cas := newStore(t, digest.SHA256)
		x := cas.blob(t, "contents")
		c := newCache(t, 1<<20, cas)
		out := t.TempDir()
		first := filepath.Join(out, "first")
		mustLink(t, c, x, false, first)

		full := true
		linkFunc = func(oldname, newname string) error {
			if full {
				full = false
				return &os.LinkError{Op: "link", Old: oldname, New: newname, Err: syscall.EMLINK}
			}
			return os.Link(oldname, newname)
		}
		defer func() { linkFunc = os.Link }()
		second := filepath.Join(out, "second")
		mustLink(t, c, x, false, second)
		cached := c.path(cacheKey{d: x})
		if sameFile(t, first, cached) {
			t.Error("the cached inode with too many links was kept")
		}
		if !sameFile(t, second, cached) {
			t.Error("not linked to the new cached inode")
		}
		checkContents(t, second, "contents", 0o444)
		checkContents(t, first, "contents", 0o444)
	})
}

func TestCacheReopen(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	a, b := cas.blob(t, "aaaa"), cas.blob(t, "bbbbbb")
	dir := filepath.Join(t.TempDir(), "cache")
	c, err := NewCache(dir, 1<<20, cas)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	mustLink(t, c, a, false, filepath.Join(out, "a"))
	mustLink(t, c, b, true, filepath.Join(out, "b"))
	if _, err := NewCache(dir, 1<<20, cas); err == nil {
		t.Fatal("a second Cache opened a locked directory")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// Debris of a crash and of strangers.
	removed := []string{
		filepath.Join(dir, "tmp", "fetch-123"),
		filepath.Join(dir, "sha256", "junk"),
		filepath.Join(dir, "sha256", a.Hex()+"-5"),  // wrong size
		filepath.Join(dir, "sha256", a.Hex()+"-04"), // not canonical
	}
	// Well-formed, so kept and accounted: contents are not hashed at start.
	kept := filepath.Join(dir, "blake3", a.Hex()+"-4")
	for _, p := range append(removed, kept) {
		if err := os.WriteFile(p, []byte("aaaa"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A wrong mode is repaired.
	if err := os.Chmod(c.path(cacheKey{d: b, executable: true}), 0o644); err != nil {
		t.Fatal(err)
	}

	c, err = NewCache(dir, 1<<20, cas)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, p := range removed {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s not removed: %v", p, err)
		}
	}
	if fi, err := os.Lstat(kept); err != nil || fi.Mode() != 0o444 {
		t.Errorf("%s: %v, %v; want it kept with mode 0444", kept, fi, err)
	}
	if s := c.Stats(); s.Files != 3 || s.Bytes != 4+6+4 {
		t.Errorf("stats = %+v, want 3 files of 14 bytes", s)
	}
	gets := cas.totalGets()
	mustLink(t, c, a, false, filepath.Join(out, "a2"))
	mustLink(t, c, b, true, filepath.Join(out, "b2"))
	if n := cas.totalGets(); n != gets {
		t.Errorf("reopened cache fetched %d blobs", n-gets)
	}
	checkContents(t, filepath.Join(out, "b2"), "bbbbbb", 0o555)
	if s := c.Stats(); s.Hits != 2 {
		t.Errorf("stats = %+v, want 2 hits", s)
	}
}

func TestCacheEvictsAtOpen(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	dir := filepath.Join(t.TempDir(), "cache")
	c, err := NewCache(dir, 1<<20, cas)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	var ds []digest.Digest
	for _, s := range []string{"1111", "2222", "3333"} {
		d := cas.blob(t, s)
		ds = append(ds, d)
		mustLink(t, c, d, false, filepath.Join(out, s))
		time.Sleep(10 * time.Millisecond) // distinct inode change times
	}
	c.Close()
	c, err = NewCache(dir, 8, cas)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if s := c.Stats(); s.Files != 2 || s.Evictions != 1 {
		t.Errorf("stats = %+v, want 2 files after 1 eviction", s)
	}
	if _, err := os.Lstat(c.path(cacheKey{d: ds[0]})); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("oldest file kept: %v", err)
	}
}

func TestCacheLinkErrors(t *testing.T) {
	cas := newStore(t, digest.SHA256)
	c := newCache(t, 1<<20, cas)
	out := t.TempDir()

	gone := digest.Compute(digest.SHA256, []byte("gone"))
	err := c.Link(context.Background(), gone, false, filepath.Join(out, "gone"))
	if !blobstore.IsNotFound(err) || !strings.Contains(err.Error(), "fetch input "+gone.String()) {
		t.Errorf("error %v, want NOT_FOUND naming %s", err, gone)
	}

	x := cas.blob(t, "x")
	p := filepath.Join(out, "x")
	mustLink(t, c, x, false, p)
	if err := c.Link(context.Background(), x, false, p); !errors.Is(err, fs.ErrExist) {
		t.Errorf("linking over an existing file: %v, want EEXIST", err)
	}

	// A cached file removed behind the cache's back is fetched again.
	if err := os.Remove(c.path(cacheKey{d: x})); err != nil {
		t.Fatal(err)
	}
	mustLink(t, c, x, false, filepath.Join(out, "x2"))
	checkContents(t, filepath.Join(out, "x2"), "x", 0o444)
	if n := cas.getCount(x); n != 2 {
		t.Errorf("fetched %d times, want 2", n)
	}
}

// blockingStore's first Get waits for its context to end.
type blockingStore struct {
	*store
	started chan struct{}
	first   bool
}

func (s *blockingStore) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	s.mu.Lock()
	first := !s.first
	s.first = true
	s.mu.Unlock()
	if first {
		close(s.started)
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return s.store.Get(ctx, d)
}

func TestCacheFetcherCanceled(t *testing.T) {
	inner := newStore(t, digest.SHA256)
	x := inner.blob(t, "x")
	cas := &blockingStore{store: inner, started: make(chan struct{})}
	c := newCache(t, 1<<20, cas)
	out := t.TempDir()

	ctx1, cancel := context.WithCancel(context.Background())
	defer cancel()
	err1 := make(chan error, 1)
	go func() { err1 <- c.Link(ctx1, x, false, filepath.Join(out, "1")) }()
	<-cas.started
	err2 := make(chan error, 1)
	go func() { err2 <- c.Link(context.Background(), x, false, filepath.Join(out, "2")) }()
	for c.Stats().Misses < 2 { // the second call waits for the first's fetch
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-err1; status.Code(err) != codes.Canceled {
		t.Errorf("canceled call: %v, want CANCELED", err)
	}
	if err := <-err2; err != nil {
		t.Errorf("waiting call: %v, want it to fetch again", err)
	}
	checkContents(t, filepath.Join(out, "2"), "x", 0o444)

	// A waiter whose own context ends stops waiting.
	y := inner.blob(t, "y")
	cas.first, cas.started = false, make(chan struct{})
	ctx3, cancel3 := context.WithCancel(context.Background())
	defer cancel3()
	go func() { c.Link(ctx3, y, false, filepath.Join(out, "3")) }()
	<-cas.started
	ctx4, cancel4 := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel4()
	if err := c.Link(ctx4, y, false, filepath.Join(out, "4")); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waiter: %v, want its deadline", err)
	}
}
