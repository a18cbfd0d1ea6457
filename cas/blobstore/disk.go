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
	"sync/atomic"
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
	// PackBelow: CAS blobs smaller than this are appended to pack files
	// instead of getting a file each; 0 disables packing.
	PackBelow int64
	// PackSize is the size at which a pack file is sealed (default 64 MiB,
	// and at most MaxSize/8).
	PackSize int64
	// DirectIO writes and reads CAS blobs of DirectIOMin bytes and more
	// with O_DIRECT where the file system supports it (see directio.go).
	DirectIO bool
	// Logger receives warnings about corrupt blobs; nil means slog.Default.
	Logger *slog.Logger
}

// NewDisk returns a BlobAccess that stores blobs under dir. A blob is
// either a file, dir/{function}/{hash[:2]}/{hash}-{size}, written to
// dir/tmp, verified, optionally fsync'ed and renamed into place, or, if it
// is smaller than PackBelow, a record in a pack file under dir/packs (see
// pack.go). Either way a crash at any point leaves the whole blob or
// nothing. An in-memory index of the stored blobs, rebuilt from the
// directory at start, answers FindMissing and orders eviction by last use.
// The directory is locked against use by a second process.
func NewDisk(kind Kind, dir string, opts DiskOptions) (BlobAccess, error) {
	if opts.MaxSize <= 0 {
		return nil, fmt.Errorf("disk store %s: max size must be positive", dir)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if kind != CAS {
		opts.PackBelow = 0 // action results are overwritten; keep them as files
	}
	if kind != CAS {
		opts.DirectIO = false
	}
	if opts.PackSize <= 0 {
		opts.PackSize = 64 << 20
	}
	opts.PackSize = max(min(opts.PackSize, opts.MaxSize/8), 4096)
	s := &disk{kind: kind, dir: dir, opts: opts, index: make(map[digest.Digest]*diskEntry), byHash: hashIndex{}, lru: list.New()}
	if err := s.open(); err != nil {
		if s.lock != nil {
			s.lock.Close()
		}
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
	// appendMu guards the queue of records waiting to be appended to the
	// current pack; one goroutine at a time (appending) writes them.
	appendMu    sync.Mutex
	appendQueue []*pendingRecord
	appending   bool
	// indexers are the goroutines writing indexes of sealed packs, and
	// the one creating shard directories (mkShards), which stops once
	// closing is set.
	indexers sync.WaitGroup
	closing  atomic.Bool

	mu    sync.Mutex
	index map[digest.Digest]*diskEntry
	// byHash indexes the BLAKE3 entries of index by hash (HashLookup).
	byHash hashIndex
	lru    *list.List // file entries; front is most recently used
	packs  []*pack    // oldest first; the last one takes writes
	size   int64      // bytes of blob files plus bytes of packs
	clock  uint64     // use counter ordering files against packs
}

// diskEntry is a stored blob: a file (elem != nil) or a pack record.
type diskEntry struct {
	d       digest.Digest
	size    int64 // bytes on disk (files)
	elem    *list.Element
	lastUse uint64
	pack    *pack
	off     int64
}

// Close releases the lock on the directory and closes the packs.
func (s *disk) Close() error {
	s.closing.Store(true)
	s.indexers.Wait()
	s.mu.Lock()
	for _, p := range s.packs {
		p.close()
	}
	s.mu.Unlock()
	return s.lock.Close()
}

func (s *disk) tmpDir() string { return filepath.Join(s.dir, "tmp") }

func (s *disk) path(d digest.Digest) string {
	h := d.Hex()
	return filepath.Join(s.dir, d.Function().String(), h[:2], h+"-"+strconv.FormatInt(d.Size(), 10))
}

// open creates the directory layout (shard directories are created as
// files need them), takes the lock, removes leftovers of
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
	for _, d := range []string{s.tmpDir(), s.packDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("disk store: %w", err)
		}
	}
	// Files and packs are ordered together by modification time, so the
	// use clock starts out as close to the true order as the disk tells.
	type item struct {
		mtime time.Time
		e     *diskEntry
		p     *pack
		recs  []packRecord
	}
	var items []item
	for _, fn := range digest.Functions {
		// Shard directories may be missing: they are created in the
		// background after opening, and by the first blob file they
		// hold (putFile).
		fnDir := filepath.Join(s.dir, fn.String())
		present, err := os.ReadDir(fnDir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("disk store: %w", err)
		}
		shards := make(map[string]bool, len(present))
		for _, e := range present {
			shards[e.Name()] = e.IsDir()
		}
		for i := 0; i < 256; i++ {
			if !shards[fmt.Sprintf("%02x", i)] {
				continue
			}
			shard := filepath.Join(fnDir, fmt.Sprintf("%02x", i))
			ents, err := os.ReadDir(shard)
			if err != nil {
				return fmt.Errorf("disk store: %w", err)
			}
			for _, e := range ents {
				d, ok := parseBlobName(fn, e.Name())
				ok = ok && strings.HasPrefix(e.Name(), fmt.Sprintf("%02x", i))
				info, err := e.Info()
				if !ok || err != nil || !info.Mode().IsRegular() || (s.kind == CAS && info.Size() != d.Size()) {
					// Not ours, or truncated by a power loss without fsync.
					s.opts.Logger.Warn("disk store: removing unexpected file", "path", filepath.Join(shard, e.Name()))
					os.Remove(filepath.Join(shard, e.Name()))
					continue
				}
				items = append(items, item{mtime: info.ModTime(), e: &diskEntry{d: d, size: info.Size()}})
			}
		}
	}
	ids, err := listPacks(s.packDir())
	if err != nil {
		return fmt.Errorf("disk store: %w", err)
	}
	removeStaleIndexes(s.packDir(), ids)
	for i, id := range ids {
		f, err := os.OpenFile(filepath.Join(s.packDir(), packName(id)), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("disk store: %w", err)
		}
		info, err := f.Stat()
		if err != nil {
			f.Close()
			return fmt.Errorf("disk store: %w", err)
		}
		recs, idxSize, indexed := s.readIndex(id, info.Size())
		good := info.Size()
		if !indexed {
			os.Remove(filepath.Join(s.packDir(), indexName(id)))
			if recs, good, err = scanPack(f); err != nil {
				f.Close()
				return fmt.Errorf("disk store: scan %s: %w", f.Name(), err)
			}
		}
		if good < info.Size() {
			// A torn last record (crash while appending) or damage.
			s.opts.Logger.Warn("disk store: truncating pack after its last intact record", "pack", f.Name(), "size", info.Size(), "intact", good, "newest", i == len(ids)-1)
			if err := f.Truncate(good); err != nil {
				f.Close()
				return fmt.Errorf("disk store: %w", err)
			}
		}
		if good == 0 {
			f.Close()
			os.Remove(f.Name())
			os.Remove(filepath.Join(s.packDir(), indexName(id)))
			continue
		}
		p := &pack{id: id, f: f, size: good, idxSize: idxSize}
		p.mapPack(good)
		items = append(items, item{mtime: info.ModTime(), p: p, recs: recs})
	}
	sort.SliceStable(items, func(i, j int) bool { return items[i].mtime.Before(items[j].mtime) })
	var toIndex []*pack // sealed packs without an index (the last one written before a restart)
	for _, it := range items {
		s.clock++
		if it.e != nil {
			it.e.lastUse = s.clock
			it.e.elem = s.lru.PushFront(it.e)
			s.index[it.e.d] = it.e
			s.byHash.add(it.e.d)
			s.size += it.e.size
			continue
		}
		p := it.p
		p.sealed = s.clock
		s.packs = append(s.packs, p)
		s.size += p.size + p.idxSize
		p.recs = it.recs
		if len(p.recs) > 0 && !indexExists(s.packDir(), p.id) {
			toIndex = append(toIndex, p)
		}
		for _, r := range it.recs {
			if old, ok := s.index[r.d]; ok && old.elem != nil {
				continue // a file copy exists; keep it
			}
			s.index[r.d] = &diskEntry{d: r.d, pack: p, off: r.off}
			s.byHash.add(r.d)
		}
	}
	// Packs must stay in id order (eviction is oldest first).
	sort.Slice(s.packs, func(i, j int) bool { return s.packs[i].id < s.packs[j].id })
	var next uint64 = 1
	if n := len(s.packs); n > 0 {
		next = s.packs[n-1].id + 1
	}
	p, err := s.createPack(next)
	if err != nil {
		return fmt.Errorf("disk store: %w", err)
	}
	s.packs = append(s.packs, p)
	s.evict()
	for _, p := range toIndex {
		s.indexers.Add(1)
		go func(p *pack, size int64, recs []packRecord) {
			defer s.indexers.Done()
			s.writeIndex(p, size, recs)
		}(p, p.size, p.recs)
	}
	if !s.opts.Fsync {
		// Create the missing shard directories off the caller's path
		// (putFile also creates its own on demand): 512 mkdirs would
		// otherwise delay the store's opening, or, left all to putFile,
		// the first blob files.
		s.indexers.Add(1)
		go func() {
			defer s.indexers.Done()
			s.mkShards()
		}()
	}
	return nil
}

// mkShards creates the shard directories that do not exist yet.
func (s *disk) mkShards() {
	for _, fn := range digest.Functions {
		for i := 0; i < 256 && !s.closing.Load(); i++ {
			if err := s.mkShard(filepath.Join(s.dir, fn.String(), fmt.Sprintf("%02x", i))); err != nil {
				return // putFile reports it, if it matters
			}
		}
	}
}

// removeStaleIndexes removes pack indexes whose pack is gone and
// leftovers of interrupted index writes.
func removeStaleIndexes(dir string, ids []uint64) {
	packs := make(map[string]bool, len(ids))
	for _, id := range ids {
		packs[indexName(id)] = true
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		n := e.Name()
		if strings.HasSuffix(n, ".tmp") || strings.HasSuffix(n, ".idx") && !packs[n] {
			os.Remove(filepath.Join(dir, n))
		}
	}
}

func indexExists(dir string, id uint64) bool {
	_, err := os.Stat(filepath.Join(dir, indexName(id)))
	return err == nil
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

func (s *disk) stripe(d digest.Digest) *sync.Mutex {
	h := d.Hash()
	return &s.stripes[h[0]%uint8(len(s.stripes))]
}

// touchLocked marks e used and reports whether it is a pack record old
// enough to be refreshed (copied into the current pack).
func (s *disk) touchLocked(e *diskEntry) bool {
	s.clock++
	if e.elem != nil {
		e.lastUse = s.clock
		s.lru.MoveToFront(e.elem)
		return false
	}
	// Refresh records in the oldest quarter of the packs.
	n := len(s.packs)
	return n >= 4 && e.pack.id < s.packs[n/4].id
}

// lookup returns the entry of d, marking it used.
func (s *disk) lookup(d digest.Digest) (diskEntry, bool) {
	s.mu.Lock()
	e, ok := s.index[d]
	var refresh bool
	var cp diskEntry
	if ok {
		refresh = s.touchLocked(e)
		cp = *e
	}
	s.mu.Unlock()
	if refresh {
		s.refresh([]diskEntry{cp})
	}
	return cp, ok
}

// refresh copies pack records into the current pack so that evicting
// their old pack does not lose them.
func (s *disk) refresh(es []diskEntry) {
	for _, e := range es {
		data, err := s.readRecord(e.pack, e.off, e.d)
		if err != nil {
			continue
		}
		if err := s.putPacked(e.d, data); err != nil {
			s.opts.Logger.Debug("disk store: refresh failed", "digest", e.d.Sprint(), "err", err)
		}
	}
}

// forget drops d from the index and removes its file.
func (s *disk) forget(d digest.Digest) {
	st := s.stripe(d)
	st.Lock()
	defer st.Unlock()
	s.mu.Lock()
	e, ok := s.index[d]
	if ok {
		s.removeLocked(e)
	}
	s.mu.Unlock()
	if ok && e.elem != nil {
		os.Remove(s.path(d))
	}
}

func (s *disk) removeLocked(e *diskEntry) {
	delete(s.index, e.d)
	s.byHash.remove(e.d)
	if e.elem != nil {
		s.lru.Remove(e.elem)
		s.size -= e.size
	}
}

// removeEvicted removes the files of evicted blobs, unless a concurrent Put
// has stored the blob again since, and the files of evicted packs.
func (s *disk) removeEvicted(files []digest.Digest, packs []*pack) {
	for _, v := range files {
		st := s.stripe(v)
		st.Lock()
		s.mu.Lock()
		e, back := s.index[v]
		back = back && e.elem != nil
		s.mu.Unlock()
		if !back {
			os.Remove(s.path(v))
		}
		st.Unlock()
	}
	for _, p := range packs {
		os.Remove(p.f.Name())
		os.Remove(filepath.Join(s.packDir(), indexName(p.id)))
		p.close()
	}
}

func (s *disk) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	e, ok := s.lookup(d)
	if !ok {
		return nil, NotFound(s.kind, d)
	}
	if e.pack != nil {
		data, err := s.readRecord(e.pack, e.off, d)
		if err != nil {
			return nil, err
		}
		return newBytesReadCloser(data), nil
	}
	f, err := os.Open(s.path(d))
	if errors.Is(err, fs.ErrNotExist) {
		s.forgetEntry(d, e)
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
	var rc io.ReadCloser = f
	if s.opts.DirectIO && d.Size() >= DirectIOMin {
		df, ok, err := openDirect(f.Name(), os.O_RDONLY, 0)
		if ok {
			f.Close()
			rc = newDirectReader(df, d.Size())
		} else if err != nil && errors.Is(err, fs.ErrNotExist) {
			f.Close()
			s.forgetEntry(d, e)
			return nil, NotFound(s.kind, d)
		}
	}
	if s.opts.VerifySampleRate > 0 && rand.Float64() < s.opts.VerifySampleRate {
		return &verifiedFile{rc: rc, r: digest.NewVerifyingReader(rc, d), s: s, d: d}, nil
	}
	return rc, nil
}

// DirectIOMin is the size from which DiskOptions.DirectIO applies.
const DirectIOMin = 1 << 20

// forgetEntry drops d from the index if it is still the file entry e.
func (s *disk) forgetEntry(d digest.Digest, e diskEntry) {
	s.mu.Lock()
	if cur, ok := s.index[d]; ok && cur.elem == e.elem {
		s.removeLocked(cur)
	}
	s.mu.Unlock()
}

// corrupt removes a blob whose contents do not match its digest.
func (s *disk) corrupt(d digest.Digest, why string) {
	s.opts.Logger.Error("disk store: removing corrupt blob", "digest", d.Sprint(), "reason", why)
	s.forget(d)
}

// verifiedFile streams a large blob while hashing it; a mismatch at the end
// fails the read with DataLoss and removes the blob.
type verifiedFile struct {
	rc io.ReadCloser
	r  io.Reader
	s  *disk
	d  digest.Digest
}

func (v *verifiedFile) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	if err != nil && err != io.EOF && status.Code(err) == codes.InvalidArgument {
		v.s.corrupt(v.d, status.Convert(err).Message())
		return n, status.Errorf(codes.DataLoss, "blob %s is corrupt on disk and was removed", v.d)
	}
	return n, err
}

func (v *verifiedFile) Close() error { return v.rc.Close() }

func (s *disk) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	if s.kind == CAS {
		if d.Size() > s.opts.MaxSize {
			return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the disk store (%d bytes)", d, s.opts.MaxSize)
		}
		if _, ok := s.lookup(d); ok {
			// Already stored; the caller's data need not be read.
			return nil
		}
		if d.Size() < s.opts.PackBelow {
			data, err := s.kind.readAll(d, r)
			if err != nil {
				return err
			}
			return s.putPacked(d, data)
		}
	}
	return s.putFile(d, r)
}

// putPacked appends a verified small blob to the current pack.
func (s *disk) putPacked(d digest.Digest, data []byte) error {
	pr := &pendingRecord{d: d, rec: encodeRecord(d, data), done: make(chan struct{})}
	s.appendRecords([]*pendingRecord{pr})
	return s.indexRecord(pr)
}

// indexRecord makes an appended record visible (after syncing it, if so
// configured).
func (s *disk) indexRecord(pr *pendingRecord) error {
	if pr.err != nil {
		return pr.err
	}
	p, d := pr.p, pr.d
	if s.opts.Fsync {
		if err := p.f.Sync(); err != nil {
			return ioError(err, "write blob %s", d)
		}
		if pr.sealed {
			syncDir(s.packDir())
		}
	}
	s.mu.Lock()
	if p.gone {
		// The pack was evicted between the write and now (the store is
		// small for its write rate): write the record again, a few times.
		s.mu.Unlock()
		if pr.retries >= 3 {
			return status.Errorf(codes.ResourceExhausted, "blob %s: the disk store is too small for its write rate", d)
		}
		retry := &pendingRecord{d: d, rec: pr.rec, done: make(chan struct{}), retries: pr.retries + 1}
		s.appendRecords([]*pendingRecord{retry})
		return s.indexRecord(retry)
	}
	if old, ok := s.index[d]; ok {
		s.removeLocked(old)
	}
	s.clock++
	s.index[d] = &diskEntry{d: d, pack: p, off: pr.off + packHeaderLen, lastUse: s.clock}
	s.byHash.add(d)
	files, packs := s.evictLocked()
	s.mu.Unlock()
	s.removeEvicted(files, packs)
	return nil
}

// pendingRecord is a pack record waiting to be appended.
type pendingRecord struct {
	d       digest.Digest
	rec     []byte
	done    chan struct{}
	p       *pack // where it was written
	off     int64
	sealed  bool // its write sealed p
	err     error
	retries int
}

// appendRecords appends records to the current pack with group commit:
// the first caller becomes the writer and appends, in one write, every
// record queued while it works; the others wait for it. Concurrent small
// Puts then share system calls, and a whole batch upload costs one.
func (s *disk) appendRecords(prs []*pendingRecord) {
	s.appendMu.Lock()
	s.appendQueue = append(s.appendQueue, prs...)
	if s.appending {
		s.appendMu.Unlock()
		for _, pr := range prs {
			<-pr.done
		}
		return
	}
	s.appending = true
	for len(s.appendQueue) > 0 {
		batch := s.appendQueue
		s.appendQueue = nil
		s.appendMu.Unlock()
		s.appendBatch(batch)
		s.appendMu.Lock()
	}
	s.appending = false
	s.appendMu.Unlock()
}

// appendBatch writes queued records to the current pack, sealing it and
// starting a new one when it reaches PackSize (a record always starts
// below PackSize, so a pack never outgrows its mapping).
func (s *disk) appendBatch(batch []*pendingRecord) {
	all := batch
	defer func() {
		for _, pr := range all {
			close(pr.done)
		}
	}()
	for len(batch) > 0 {
		s.mu.Lock()
		p := s.packs[len(s.packs)-1]
		s.mu.Unlock()
		start := p.size
		end := start
		n := 0
		for n < len(batch) && end < s.opts.PackSize {
			end += int64(len(batch[n].rec))
			n++
		}
		if n == 0 {
			n, end = 1, start+int64(len(batch[0].rec))
		}
		buf := batch[0].rec
		if n > 1 {
			buf = make([]byte, 0, end-start)
			for _, pr := range batch[:n] {
				buf = append(buf, pr.rec...)
			}
		}
		_, err := p.f.WriteAt(buf, start)
		if err != nil {
			// Drop the partial records: on a full disk they would keep
			// holding the space they got until the store is reopened.
			p.f.Truncate(start)
			for _, pr := range batch {
				pr.err = ioError(err, "write blob %s", pr.d)
			}
			return
		}
		off := start
		for _, pr := range batch[:n] {
			pr.p, pr.off = p, off
			off += int64(len(pr.rec))
		}
		s.mu.Lock()
		p.size = end
		s.size += end - start
		for _, pr := range batch[:n] {
			p.recs = append(p.recs, packRecord{d: pr.d, off: pr.off + packHeaderLen})
		}
		s.mu.Unlock()
		if end >= s.opts.PackSize {
			np, err := s.createPack(p.id + 1)
			if err != nil {
				for _, pr := range batch[n:] {
					pr.err = ioError(err, "write blob %s: new pack", pr.d)
				}
				return
			}
			batch[n-1].sealed = true
			s.mu.Lock()
			s.clock++
			p.sealed = s.clock
			s.packs = append(s.packs, np)
			recs, size := p.recs, p.size
			s.mu.Unlock()
			s.indexers.Add(1)
			go func() {
				defer s.indexers.Done()
				s.writeIndex(p, size, recs)
			}()
		}
		batch = batch[n:]
	}
}

// putFile writes a blob to its own file.
func (s *disk) putFile(d digest.Digest, r io.Reader) error {
	var f *os.File
	direct := false
	if s.opts.DirectIO && d.Size() >= DirectIOMin {
		name := filepath.Join(s.tmpDir(), fmt.Sprintf("put-%016x", rand.Uint64()))
		var err error
		if f, direct, err = openDirect(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644); err != nil {
			return ioError(err, "write blob %s", d)
		}
	}
	if f == nil {
		var err error
		if f, err = os.CreateTemp(s.tmpDir(), "put-"); err != nil {
			return ioError(err, "write blob %s", d)
		}
	}
	tmp := f.Name()
	if s.kind == CAS && d.Size() >= 1<<20 {
		// Reserve the space up front: a full disk fails before any data
		// is received, and extent allocation is cheaper in one piece.
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, d.Size()); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
			f.Close()
			os.Remove(tmp)
			return ioError(err, "write blob %s", d)
		}
	}
	n, err := s.write(f, direct, d, r)
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
	err = os.Rename(tmp, dst)
	if errors.Is(err, fs.ErrNotExist) {
		// The first file of its shard.
		if err = s.mkShard(filepath.Dir(dst)); err == nil {
			err = os.Rename(tmp, dst)
		}
	}
	if err != nil {
		st.Unlock()
		os.Remove(tmp)
		return ioError(err, "write blob %s", d)
	}
	s.mu.Lock()
	if old, ok := s.index[d]; ok {
		s.removeLocked(old)
	}
	s.clock++
	e := &diskEntry{d: d, size: n, lastUse: s.clock}
	e.elem = s.lru.PushFront(e)
	s.index[d] = e
	s.byHash.add(d)
	s.size += n
	files, packs := s.evictLocked()
	s.mu.Unlock()
	st.Unlock()
	s.removeEvicted(files, packs)
	if s.opts.Fsync {
		if err := syncDir(filepath.Dir(dst)); err != nil {
			return ioError(err, "write blob %s", d)
		}
	}
	return nil
}

// mkShard creates the shard directory dir, DIR/{function}/{hh}, and with
// Fsync makes its entry (and its parent's) durable, so that a blob renamed
// into it and synced is too.
func (s *disk) mkShard(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !s.opts.Fsync {
		return nil
	}
	if err := syncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	return syncDir(s.dir)
}

// write copies the verified data into f, opened with O_DIRECT if direct,
// and returns its size.
func (s *disk) write(f *os.File, direct bool, d digest.Digest, r io.Reader) (int64, error) {
	var n int64
	var err error
	if br, ok := r.(*bytes.Reader); ok && !direct && s.kind == CAS && br.Len() == int(d.Size()) && d.Size() <= 1<<20 {
		// Batch uploads hand over small in-memory blobs: verify, then write once.
		buf, rerr := s.kind.readAll(d, br)
		if rerr != nil {
			return 0, rerr
		}
		var wn int
		wn, err = f.Write(buf)
		n = int64(wn)
	} else if direct {
		w := newDirectWriter(f)
		bp := copyBufPool.Get().(*[]byte)
		n, err = io.CopyBuffer(w, s.kind.checkPut(d, r), *bp)
		copyBufPool.Put(bp)
		if err == nil {
			err = w.finish()
		} else {
			w.release()
		}
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
	files, packs := s.evictLocked()
	s.mu.Unlock()
	s.removeEvicted(files, packs)
}

// evictLocked evicts until the store fits: each step removes whichever was
// used least recently, the least recently used file or the oldest sealed
// pack (with all its records). It returns what the caller must delete.
func (s *disk) evictLocked() ([]digest.Digest, []*pack) {
	var files []digest.Digest
	var packs []*pack
	for s.size > s.opts.MaxSize {
		var fe *diskEntry
		if b := s.lru.Back(); b != nil && s.lru.Len() > 1 {
			fe = b.Value.(*diskEntry)
		}
		var op *pack
		if len(s.packs) > 1 {
			op = s.packs[0]
		}
		switch {
		case op != nil && (fe == nil || op.sealed < fe.lastUse):
			s.packs = s.packs[1:]
			op.gone = true
			s.size -= op.size + op.idxSize
			for _, r := range op.recs {
				if e, ok := s.index[r.d]; ok && e.pack == op {
					delete(s.index, r.d)
					s.byHash.remove(r.d)
				}
			}
			op.recs = nil
			packs = append(packs, op)
		case fe != nil:
			s.removeLocked(fe)
			files = append(files, fe.d)
		default:
			return files, packs
		}
	}
	return files, packs
}

func (s *disk) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	var missing []digest.Digest
	var refresh []diskEntry
	s.mu.Lock()
	for _, d := range ds {
		if e, ok := s.index[d]; ok {
			if s.touchLocked(e) {
				refresh = append(refresh, *e)
			}
		} else {
			missing = append(missing, d)
		}
	}
	s.mu.Unlock()
	if len(refresh) > 0 {
		s.refresh(refresh)
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
