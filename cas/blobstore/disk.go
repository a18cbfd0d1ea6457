package blobstore

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// DiskOptions configures a disk BlobAccess.
type DiskOptions struct {
	// MaxSize bounds the bytes stored; least recently used blobs are
	// evicted beyond it.
	MaxSize int64
	// Fsync makes every write durable across power loss before it becomes
	// visible. Without it writes survive a crash of the process (kill -9)
	// but not of the machine; reads still never serve a torn blob, because
	// sizes and hashes are verified.
	Fsync bool
	// VerifyBelow: CAS blobs up to this size are verified on every read.
	VerifyBelow int64
	// VerifySampleRate is the fraction of reads of larger blobs verified.
	VerifySampleRate float64
	// Logger receives warnings about corrupt blobs; nil means slog.Default.
	Logger *slog.Logger
}

// NewDisk returns a BlobAccess that stores each blob as a file under dir:
// dir/{function}/{hash[:2]}/{hash}-{size}. A blob is written to dir/tmp,
// verified, optionally fsync'ed, and renamed into place, so a crash at any
// point leaves either the whole blob or nothing. An in-memory index of the
// stored blobs, rebuilt from the directory at start, answers FindMissing and
// orders eviction by last use. The directory is locked against use by a
// second process.
func NewDisk(kind Kind, dir string, opts DiskOptions) (BlobAccess, error) {
	if opts.MaxSize <= 0 {
		return nil, fmt.Errorf("disk store %s: max size must be positive", dir)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &disk{kind: kind, dir: dir, opts: opts, index: make(map[digest.Digest]*list.Element), lru: list.New()}
	if err := s.open(); err != nil {
		return nil, err
	}
	return s, nil
}

type disk struct {
	kind Kind
	dir  string
	opts DiskOptions
	lock *os.File

	// stripes serialise the file operations (rename into place, removal)
	// on one digest, so that an eviction never removes a file that a
	// concurrent Put has just renamed into place and indexed.
	stripes [64]sync.Mutex

	mu    sync.Mutex
	index map[digest.Digest]*list.Element // values are *diskEntry
	lru   *list.List                      // front is most recently used
	size  int64
}

type diskEntry struct {
	d    digest.Digest
	size int64 // bytes on disk
}

// Close releases the lock on the directory.
func (s *disk) Close() error { return s.lock.Close() }

func (s *disk) tmpDir() string { return filepath.Join(s.dir, "tmp") }

func (s *disk) path(d digest.Digest) string {
	h := d.Hex()
	return filepath.Join(s.dir, d.Function().String(), h[:2], h+"-"+strconv.FormatInt(d.Size(), 10))
}

// open creates the directory layout, takes the lock, removes leftovers of
// interrupted writes and loads the index.
func (s *disk) open() error {
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return fmt.Errorf("disk store: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(s.dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("disk store: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return fmt.Errorf("disk store %s is in use by another process: %w", s.dir, err)
	}
	s.lock = lock
	// Interrupted writes leave only temporary files, never a final name.
	if err := os.RemoveAll(s.tmpDir()); err != nil {
		return fmt.Errorf("disk store: remove leftovers: %w", err)
	}
	if err := os.MkdirAll(s.tmpDir(), 0o755); err != nil {
		return fmt.Errorf("disk store: %w", err)
	}
	type found struct {
		d     digest.Digest
		size  int64
		mtime time.Time
	}
	var all []found
	for _, fn := range digest.Functions {
		for i := 0; i < 256; i++ {
			shard := filepath.Join(s.dir, fn.String(), fmt.Sprintf("%02x", i))
			if err := os.MkdirAll(shard, 0o755); err != nil {
				return fmt.Errorf("disk store: %w", err)
			}
			ents, err := os.ReadDir(shard)
			if err != nil {
				return fmt.Errorf("disk store: %w", err)
			}
			for _, e := range ents {
				d, ok := parseBlobName(fn, e.Name())
				info, err := e.Info()
				if !ok || err != nil || !info.Mode().IsRegular() || (s.kind == CAS && info.Size() != d.Size()) {
					// Not ours, or truncated by a power loss without fsync.
					s.opts.Logger.Warn("disk store: removing unexpected file", "path", filepath.Join(shard, e.Name()))
					os.Remove(filepath.Join(shard, e.Name()))
					continue
				}
				all = append(all, found{d, info.Size(), info.ModTime()})
			}
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.After(all[j].mtime) })
	for _, f := range all {
		s.index[f.d] = s.lru.PushBack(&diskEntry{d: f.d, size: f.size})
		s.size += f.size
	}
	s.evict()
	return nil
}

func parseBlobName(fn digest.Function, name string) (digest.Digest, bool) {
	h, sz, ok := strings.Cut(name, "-")
	if !ok {
		return digest.Digest{}, false
	}
	size, err := strconv.ParseInt(sz, 10, 64)
	if err != nil {
		return digest.Digest{}, false
	}
	d, err := digest.Parse(fn, h, size)
	return d, err == nil
}

// lookup reports whether d is indexed, marking it used.
func (s *disk) lookup(d digest.Digest) bool {
	s.mu.Lock()
	e, ok := s.index[d]
	if ok {
		s.lru.MoveToFront(e)
	}
	s.mu.Unlock()
	return ok
}

func (s *disk) stripe(d digest.Digest) *sync.Mutex {
	h := d.Hash()
	return &s.stripes[h[0]%uint8(len(s.stripes))]
}

// forget drops d from the index and removes its file.
func (s *disk) forget(d digest.Digest) {
	st := s.stripe(d)
	st.Lock()
	defer st.Unlock()
	s.mu.Lock()
	if e, ok := s.index[d]; ok {
		s.lru.Remove(e)
		delete(s.index, d)
		s.size -= e.Value.(*diskEntry).size
	}
	s.mu.Unlock()
	os.Remove(s.path(d))
}

// removeEvicted removes the files of evicted blobs, unless a concurrent Put
// has stored the blob again since.
func (s *disk) removeEvicted(victims []digest.Digest) {
	for _, v := range victims {
		st := s.stripe(v)
		st.Lock()
		s.mu.Lock()
		_, back := s.index[v]
		s.mu.Unlock()
		if !back {
			os.Remove(s.path(v))
		}
		st.Unlock()
	}
}

func (s *disk) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if !s.lookup(d) {
		return nil, NotFound(s.kind, d)
	}
	f, err := os.Open(s.path(d))
	if errors.Is(err, fs.ErrNotExist) {
		s.forget(d)
		return nil, NotFound(s.kind, d)
	} else if err != nil {
		return nil, ioError(err, "read blob %s", d)
	}
	if s.kind == AC {
		defer f.Close()
		data, err := io.ReadAll(io.LimitReader(f, MaxACEntrySize))
		if err != nil {
			return nil, ioError(err, "read action result %s", d)
		}
		return newBytesReadCloser(data), nil
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, ioError(err, "read blob %s", d)
	}
	if fi.Size() != d.Size() {
		f.Close()
		s.corrupt(d, fmt.Sprintf("file has %d bytes", fi.Size()))
		return nil, NotFound(s.kind, d)
	}
	if d.Size() <= s.opts.VerifyBelow {
		// Small blob: verify before serving, so a corrupt one is a miss.
		defer f.Close()
		buf := make([]byte, d.Size())
		if _, err := io.ReadFull(f, buf); err != nil {
			return nil, ioError(err, "read blob %s", d)
		}
		if err := d.Verify(buf); err != nil {
			s.corrupt(d, status.Convert(err).Message())
			return nil, NotFound(s.kind, d)
		}
		return newBytesReadCloser(buf), nil
	}
	if s.opts.VerifySampleRate > 0 && rand.Float64() < s.opts.VerifySampleRate {
		return &verifiedFile{f: f, r: digest.NewVerifyingReader(f, d), s: s, d: d}, nil
	}
	return f, nil
}

// corrupt removes a blob whose contents do not match its digest.
func (s *disk) corrupt(d digest.Digest, why string) {
	s.opts.Logger.Error("disk store: removing corrupt blob", "digest", d.Sprint(), "reason", why)
	s.forget(d)
}

// verifiedFile streams a large blob while hashing it; a mismatch at the end
// fails the read with DataLoss and removes the blob.
type verifiedFile struct {
	f *os.File
	r io.Reader
	s *disk
	d digest.Digest
}

func (v *verifiedFile) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	if err != nil && err != io.EOF {
		if status.Code(err) == codes.InvalidArgument {
			v.s.corrupt(v.d, status.Convert(err).Message())
			return n, status.Errorf(codes.DataLoss, "blob %s is corrupt on disk and was removed", v.d)
		}
	}
	return n, err
}

func (v *verifiedFile) Close() error { return v.f.Close() }

func (s *disk) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	if s.kind == CAS {
		if d.Size() > s.opts.MaxSize {
			return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the disk store (%d bytes)", d, s.opts.MaxSize)
		}
		if s.lookup(d) {
			// Already stored; the caller's data need not be read.
			return nil
		}
	}
	f, err := os.CreateTemp(s.tmpDir(), "put-")
	if err != nil {
		return ioError(err, "write blob %s", d)
	}
	tmp := f.Name()
	n, err := s.write(f, d, r)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = ioError(cerr, "write blob %s", d)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	dst := s.path(d)
	st := s.stripe(d)
	st.Lock()
	if err := os.Rename(tmp, dst); err != nil {
		st.Unlock()
		os.Remove(tmp)
		return ioError(err, "write blob %s", d)
	}
	s.mu.Lock()
	if e, ok := s.index[d]; ok {
		ent := e.Value.(*diskEntry)
		s.size += n - ent.size
		ent.size = n
		s.lru.MoveToFront(e)
	} else {
		s.index[d] = s.lru.PushFront(&diskEntry{d: d, size: n})
		s.size += n
	}
	victims := s.evictLocked()
	s.mu.Unlock()
	st.Unlock()
	s.removeEvicted(victims)
	if s.opts.Fsync {
		if err := syncDir(filepath.Dir(dst)); err != nil {
			return ioError(err, "write blob %s", d)
		}
	}
	return nil
}

// write copies the verified data into f and returns its size.
func (s *disk) write(f *os.File, d digest.Digest, r io.Reader) (int64, error) {
	var n int64
	var err error
	if br, ok := r.(*bytes.Reader); ok && s.kind == CAS && br.Len() == int(d.Size()) && d.Size() <= 1<<20 {
		// Batch uploads hand over small in-memory blobs: verify, then write once.
		buf, rerr := s.kind.readAll(d, br)
		if rerr != nil {
			return 0, rerr
		}
		var wn int
		wn, err = f.Write(buf)
		n = int64(wn)
	} else {
		bp := copyBufPool.Get().(*[]byte)
		n, err = io.CopyBuffer(writerOnly{f}, s.kind.checkPut(d, r), *bp)
		copyBufPool.Put(bp)
	}
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return 0, err
		}
		return 0, ioError(err, "write blob %s", d)
	}
	if s.opts.Fsync {
		if err := f.Sync(); err != nil {
			return 0, ioError(err, "write blob %s", d)
		}
	}
	return n, nil
}

func (s *disk) evict() {
	s.mu.Lock()
	victims := s.evictLocked()
	s.mu.Unlock()
	s.removeEvicted(victims)
}

// evictLocked removes least recently used entries from the index until the
// store fits and returns them; the caller removes their files.
func (s *disk) evictLocked() []digest.Digest {
	var victims []digest.Digest
	for s.size > s.opts.MaxSize && s.lru.Len() > 1 {
		e := s.lru.Back()
		ent := e.Value.(*diskEntry)
		s.lru.Remove(e)
		delete(s.index, ent.d)
		s.size -= ent.size
		victims = append(victims, ent.d)
	}
	return victims
}

func (s *disk) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	var missing []digest.Digest
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range ds {
		if e, ok := s.index[d]; ok {
			s.lru.MoveToFront(e)
		} else {
			missing = append(missing, d)
		}
	}
	return missing, nil
}

// copyBufPool holds large copy buffers: streamed writes arrive in chunks of
// up to a MiB, and copying them in 32 KiB pieces costs a handoff each.
var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// writerOnly hides os.File's ReadFrom so that io.CopyBuffer uses the buffer.
type writerOnly struct{ io.Writer }

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

