// Package inputs materialises the input root of an action, a REAPI
// Directory tree stored in the CAS, into a host directory.
//
// Files are not written into the action directory: they are hardlinks to a
// local content-addressed file cache (Cache) on the same file system, so
// an input that an earlier action already used costs one link(2). The
// Materializer walks the tree, creates the directories and symlinks, and
// links the files through the Cache.
//
// Hardlinked inputs share their inode, and thus their mode and contents,
// with the cache and with every other action that uses them. The cache
// files are read-only (0444, or 0555 for executables) and owned by the
// executor; actions must not run as their owner or as root with write
// access to the input root, or they could modify the cached file.
package inputs

import (
	"cmp"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// linkFunc creates hardlinks; tests replace it to simulate EMLINK and EXDEV.
var linkFunc = os.Link

const (
	fileMode       fs.FileMode = 0o444
	executableMode fs.FileMode = 0o555
)

// Cache is a local content-addressed store of input files from which
// action directories are populated by hardlinking. A blob is stored as
// dir/{function}/{hash}-{size}, or dir/{function}/{hash}-{size}-x for its
// executable variant; the two are separate inodes because a hardlink
// shares its mode. The total size of the files is bounded: least recently
// used files are removed beyond it, which does not affect the links that
// action directories hold to them.
//
// A Cache is safe for concurrent use. Its directory is locked against use
// by a second process.
type Cache struct {
	dir  string
	max  int64
	cas  blobstore.BlobAccess
	lock *os.File

	mu      sync.Mutex
	entries map[cacheKey]*cacheEntry
	lru     list.List // of *cacheEntry; front is most recently used
	flights map[cacheKey]*flight
	size    int64
	stats   CacheStats
}

// CacheStats are counters of a Cache.
type CacheStats struct {
	// Hits counts Link calls that found the file in the cache.
	Hits int64
	// Misses counts Link calls that did not, and waited for it to be
	// fetched from the CAS, by themselves or by a concurrent call.
	Misses int64
	// Bytes is the total size of the files in the cache.
	Bytes int64
	// Files is the number of files in the cache.
	Files int64
	// Evictions counts files removed to stay within the maximum size.
	Evictions int64
}

type cacheKey struct {
	d          digest.Digest
	executable bool
}

// cacheEntry is a file in the cache. While pins > 0, some call is about to
// link or copy the file, and eviction leaves it alone.
type cacheEntry struct {
	key  cacheKey
	elem *list.Element
	pins int
}

// flight is a fetch in progress. Unlike singleflight.Group it counts the
// calls waiting for it, so that the fetched entry is handed over pinned
// once for each of them and cannot be evicted before they have linked it.
type flight struct {
	done    chan struct{} // closed when the fetch has ended
	waiters int           // calls that will use the result; guarded by Cache.mu
	e       *cacheEntry   // the new entry, pinned waiters times, on success
	err     error
	// canceled says the fetch failed because the context of the call that
	// ran it ended; the other waiters then try again.
	canceled bool
}

// NewCache opens the file cache in dir, creating it if needed, bounded to
// maxSize bytes. Files missing from it are fetched from cas. Leftover
// temporary files are removed, and the index of cached files is rebuilt
// from the directory, ordered by their inode change time (which each
// hardlink updates) as the best estimate of their last use.
func NewCache(dir string, maxSize int64, cas blobstore.BlobAccess) (*Cache, error) {
	if maxSize <= 0 {
		return nil, fmt.Errorf("input cache %s: max size must be positive", dir)
	}
	c := &Cache{
		dir:     dir,
		max:     maxSize,
		cas:     cas,
		entries: make(map[cacheKey]*cacheEntry),
		flights: make(map[cacheKey]*flight),
	}
	if err := c.open(); err != nil {
		if c.lock != nil {
			c.lock.Close()
		}
		return nil, fmt.Errorf("input cache %s: %w", dir, err)
	}
	return c, nil
}

// Close releases the lock on the cache directory. Files linked from the
// cache stay valid; the Cache must not be used afterwards.
func (c *Cache) Close() error {
	return c.lock.Close()
}

func (c *Cache) tmpDir() string { return filepath.Join(c.dir, "tmp") }

func (c *Cache) path(k cacheKey) string {
	name := k.d.Hex() + "-" + strconv.FormatInt(k.d.Size(), 10)
	if k.executable {
		name += "-x"
	}
	return filepath.Join(c.dir, k.d.Function().String(), name)
}

func (k cacheKey) mode() fs.FileMode {
	if k.executable {
		return executableMode
	}
	return fileMode
}

// parseName parses a cache file name of function fn.
func parseName(fn digest.Function, name string) (cacheKey, bool) {
	name, exec := strings.CutSuffix(name, "-x")
	hash, sizeStr, ok := strings.Cut(name, "-")
	if !ok {
		return cacheKey{}, false
	}
	size, err := strconv.ParseInt(sizeStr, 10, 64)
	if err != nil || strconv.FormatInt(size, 10) != sizeStr {
		return cacheKey{}, false
	}
	d, err := digest.Parse(fn, hash, size)
	if err != nil {
		return cacheKey{}, false
	}
	return cacheKey{d: d, executable: exec}, true
}

func (c *Cache) open() error {
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(c.dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return fmt.Errorf("in use by another process: %w", err)
	}
	c.lock = lock
	// Interrupted fetches leave only temporary files, never a final name.
	if err := os.RemoveAll(c.tmpDir()); err != nil {
		return fmt.Errorf("remove leftovers: %w", err)
	}
	if err := os.Mkdir(c.tmpDir(), 0o700); err != nil {
		return err
	}
	type item struct {
		ctime int64
		k     cacheKey
	}
	var items []item
	for _, fn := range digest.Functions {
		dir := filepath.Join(c.dir, fn.String())
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, ent := range ents {
			p := filepath.Join(dir, ent.Name())
			k, ok := parseName(fn, ent.Name())
			var st unix.Stat_t
			if !ok || unix.Lstat(p, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != k.d.Size() {
				// Not ours: remove it rather than link it into actions.
				if err := os.RemoveAll(p); err != nil {
					return err
				}
				continue
			}
			if fs.FileMode(st.Mode)&fs.ModePerm != k.mode() {
				if err := os.Chmod(p, k.mode()); err != nil {
					return err
				}
			}
			items = append(items, item{ctime: st.Ctim.Nano(), k: k})
		}
	}
	slices.SortFunc(items, func(a, b item) int { return cmp.Compare(a.ctime, b.ctime) })
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, it := range items {
		c.insertLocked(it.k, 0)
	}
	c.evictLocked()
	return nil
}

// Stats returns the counters of the cache.
func (c *Cache) Stats() CacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Bytes = c.size
	s.Files = int64(len(c.entries))
	return s
}

// Link makes dst a hardlink to the cached file with digest d, read-only
// and, if executable is set, executable by everyone. A file not in the
// cache is fetched from the CAS first; concurrent calls for the same file
// fetch it once. If the file cannot be linked (its link count is at the
// maximum, or dst is on another file system), dst becomes a copy with the
// same mode. dst must not exist.
//
// A fetch error is returned wrapped with the digest and keeps its gRPC
// status: blobstore.IsNotFound reports a blob missing from the CAS. Data
// that does not match d is a DATA_LOSS error and is not cached.
func (c *Cache) Link(ctx context.Context, d digest.Digest, executable bool, dst string) error {
	_, err := c.link(ctx, d, executable, dst)
	return err
}

// link is Link, also reporting whether the file was fetched (a miss).
func (c *Cache) link(ctx context.Context, d digest.Digest, executable bool, dst string) (fetched bool, err error) {
	k := cacheKey{d: d, executable: executable}
	for attempt := 0; ; attempt++ {
		e, missed, err := c.acquire(ctx, k)
		fetched = fetched || missed
		if err != nil {
			return fetched, err
		}
		err = c.place(e, dst)
		gone := errors.Is(err, fs.ErrNotExist) && !c.exists(k)
		if gone {
			// Removed behind our back; fetch it again.
			c.forget(e)
		}
		c.release(e)
		if !gone || attempt > 0 {
			return fetched, err
		}
	}
}

// placeAs creates dst as pl says: a hardlink to pl.LinkTo, or else a copy
// of the cached file of d with pl's mode and owner, fetching it first if
// needed. It reports whether the file was fetched.
func (c *Cache) placeAs(ctx context.Context, d digest.Digest, executable bool, dst string, pl *Placement) (fetched bool, err error) {
	if pl.LinkTo != "" && linkFunc(pl.LinkTo, dst) == nil {
		return false, nil
	}
	k := cacheKey{d: d, executable: executable}
	for attempt := 0; ; attempt++ {
		e, missed, err := c.acquire(ctx, k)
		fetched = fetched || missed
		if err != nil {
			return fetched, err
		}
		err = copyFileOwned(c.path(k), dst, pl.Mode, pl.UID, pl.GID)
		gone := errors.Is(err, fs.ErrNotExist) && !c.exists(k)
		if gone {
			c.forget(e)
		}
		c.release(e)
		if !gone || attempt > 0 {
			if err != nil {
				err = fmt.Errorf("input %s: %w", d, err)
			}
			return fetched, err
		}
	}
}

func (c *Cache) exists(k cacheKey) bool {
	_, err := os.Lstat(c.path(k))
	return err == nil
}

// acquire returns the pinned entry for k, fetching the file if needed.
func (c *Cache) acquire(ctx context.Context, k cacheKey) (e *cacheEntry, missed bool, err error) {
	for {
		c.mu.Lock()
		if e := c.entries[k]; e != nil {
			e.pins++
			c.lru.MoveToFront(e.elem)
			if !missed {
				c.stats.Hits++
			}
			c.mu.Unlock()
			return e, missed, nil
		}
		if !missed {
			c.stats.Misses++
			missed = true
		}
		fl := c.flights[k]
		if fl == nil {
			fl = &flight{done: make(chan struct{}), waiters: 1}
			c.flights[k] = fl
			c.mu.Unlock()
			c.fetch(ctx, k, fl)
		} else {
			fl.waiters++
			c.mu.Unlock()
			select {
			case <-fl.done:
			case <-ctx.Done():
				c.mu.Lock()
				select {
				case <-fl.done:
					// Ended meanwhile: give back the pin it left for us.
					if fl.e != nil {
						c.releaseLocked(fl.e)
					}
				default:
					fl.waiters--
				}
				c.mu.Unlock()
				return nil, missed, ctx.Err()
			}
		}
		if fl.err == nil {
			return fl.e, missed, nil
		}
		if !fl.canceled || ctx.Err() != nil {
			return nil, missed, fl.err
		}
		// The call running the fetch gave up, but we did not: try again.
	}
}

// fetch runs fl: it downloads k into a temporary file, verifying it, and
// renames it into place.
func (c *Cache) fetch(ctx context.Context, k cacheKey, fl *flight) {
	err := c.download(ctx, k)
	c.mu.Lock()
	if err == nil {
		fl.e = c.insertLocked(k, fl.waiters)
		c.evictLocked()
	} else {
		fl.err = fmt.Errorf("fetch input %s: %w", k.d, err)
		fl.canceled = ctx.Err() != nil
	}
	delete(c.flights, k)
	close(fl.done)
	c.mu.Unlock()
}

func (c *Cache) download(ctx context.Context, k cacheKey) error {
	f, err := os.CreateTemp(c.tmpDir(), "fetch-")
	if err != nil {
		return err
	}
	if k.d != digest.Empty(k.d.Function()) {
		// REAPI clients need not upload the empty blob, so it is not fetched.
		err = c.read(ctx, k.d, f)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	return c.commit(f, k)
}

// read writes the blob d from the CAS to f, verifying it.
func (c *Cache) read(ctx context.Context, d digest.Digest, f *os.File) error {
	rc, err := c.cas.Get(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	r := digest.NewVerifyingReader(rc, d)
	if d.Size() < 256<<10 {
		// Most inputs are small: copy through a buffer of their size, not
		// the 256 KiB one the verifying reader's WriteTo allocates.
		_, err = io.CopyBuffer(writerOnly{f}, readerOnly{r}, make([]byte, d.Size()+1))
	} else {
		_, err = io.Copy(f, r)
	}
	return corruptError(err)
}

// corruptError turns the INVALID_ARGUMENT error of verifying a blob read
// from the CAS into DATA_LOSS, as the CAS backends report corrupt data:
// the fault is the store's, not the client's.
func corruptError(err error) error {
	if status.Code(err) == codes.InvalidArgument {
		return status.Errorf(codes.DataLoss, "the CAS served corrupt data: %s", status.Convert(err).Message())
	}
	return err
}

// readerOnly and writerOnly hide the WriteTo and ReadFrom methods that
// would make io.CopyBuffer ignore its buffer.
type (
	readerOnly struct{ io.Reader }
	writerOnly struct{ io.Writer }
)

// commit sets the mode of the temporary file f, which holds k's
// contents, closes it, and renames it into place.
func (c *Cache) commit(f *os.File, k cacheKey) error {
	err := f.Chmod(k.mode())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), c.path(k))
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// insertLocked indexes the file of k, which is in place, with pins pins.
func (c *Cache) insertLocked(k cacheKey, pins int) *cacheEntry {
	if e := c.entries[k]; e != nil {
		// Already indexed (the file was replaced by an identical one).
		e.pins += pins
		c.lru.MoveToFront(e.elem)
		return e
	}
	e := &cacheEntry{key: k, pins: pins}
	e.elem = c.lru.PushFront(e)
	c.entries[k] = e
	c.size += k.d.Size()
	return e
}

// evictLocked removes least recently used files that are not pinned until
// the cache fits its maximum size. Files are removed under the lock, so
// that a fetch cannot rename a new file into a place being cleared.
func (c *Cache) evictLocked() {
	for el := c.lru.Back(); el != nil && c.size > c.max; {
		e := el.Value.(*cacheEntry)
		el = el.Prev()
		if e.pins > 0 {
			continue
		}
		c.removeLocked(e)
		c.stats.Evictions++
		os.Remove(c.path(e.key))
	}
}

func (c *Cache) removeLocked(e *cacheEntry) {
	c.lru.Remove(e.elem)
	delete(c.entries, e.key)
	c.size -= e.key.d.Size()
}

// forget drops e from the index after its file has disappeared.
func (c *Cache) forget(e *cacheEntry) {
	c.mu.Lock()
	if c.entries[e.key] == e {
		c.removeLocked(e)
	}
	c.mu.Unlock()
}

func (c *Cache) release(e *cacheEntry) {
	c.mu.Lock()
	c.releaseLocked(e)
	c.mu.Unlock()
}

func (c *Cache) releaseLocked(e *cacheEntry) {
	e.pins--
	if e.pins == 0 && c.size > c.max {
		c.evictLocked()
	}
}

// place links the file of the pinned entry e to dst, or copies it.
func (c *Cache) place(e *cacheEntry, dst string) error {
	src := c.path(e.key)
	err := linkFunc(src, dst)
	if errors.Is(err, syscall.EMLINK) {
		// The cached inode has as many links as the file system allows.
		// Give the cache a fresh inode so that later calls link again,
		// rather than copy until the links held by actions go away.
		if rerr := c.replace(e); rerr != nil {
			return fmt.Errorf("link input %s: %w (and replacing the cached file failed: %v)", e.key.d, err, rerr)
		}
		err = linkFunc(src, dst)
	}
	if errors.Is(err, syscall.EMLINK) || errors.Is(err, syscall.EXDEV) {
		err = copyFile(src, dst, e.key.mode())
	}
	if err != nil {
		return fmt.Errorf("link input %s: %w", e.key.d, err)
	}
	return nil
}

// replace renames a copy of the cached file of the pinned entry e over it.
// Pinned, the entry is not evicted meanwhile; a concurrent replacement of
// the same entry is harmless.
func (c *Cache) replace(e *cacheEntry) error {
	src, err := os.Open(c.path(e.key))
	if err != nil {
		return err
	}
	defer src.Close()
	f, err := os.CreateTemp(c.tmpDir(), "copy-")
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, src); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	return c.commit(f, e.key)
}

// copyFile copies src to the new file dst with mode mode.
func copyFile(src, dst string, mode fs.FileMode) error {
	return copyFileOwned(src, dst, mode, -1, -1)
}

// copyFileOwned copies src to the new file dst with mode mode, owned by
// uid and gid (-1: the caller's).
func copyFileOwned(src, dst string, mode fs.FileMode, uid, gid int) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in) // copy_file_range where possible
	if err == nil {
		err = out.Chmod(mode) // not subject to the umask
	}
	if err == nil && (uid != -1 || gid != -1) {
		err = out.Chown(uid, gid)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return nil
}
