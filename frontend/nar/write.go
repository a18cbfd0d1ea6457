package nar

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Tuning of Write. A remote CAS answers each Get in a round trip, so Write
// keeps many small blobs in flight; it holds at most prefetchBytes of them
// in memory at once.
const (
	// fetchConcurrency bounds the Gets in flight, for Directory messages
	// and for file contents.
	fetchConcurrency = 16
	// prefetchBelow is the size below which file contents are fetched
	// ahead into memory. Larger files are streamed when their turn comes.
	prefetchBelow = 1 << 20
	// prefetchBytes bounds the prefetched contents held at once, and
	// prefetchBlobs their number.
	prefetchBytes = 32 << 20
	prefetchBlobs = 4096
	// maxDepth bounds the nesting of directories.
	maxDepth = 4096
)

// Write writes the NAR serialisation of n, read from cas, to w: the bytes
// `nix-store --dump` writes for the same tree on disk. Directory entries
// are sorted by the raw bytes of their names, whatever the lists of the
// Directory message they come from; files are executable as their
// is_executable says; empty directories have no entries. Directory
// messages and file contents use digest function fn.
//
// Write first reads every Directory message of the tree, level by level,
// up to 16 at a time. It then streams the NAR in order while fetching the
// contents of small files (below 1 MiB) ahead, up to 16 at a time and 32
// MiB in all, so that a tree of many small files costs few round trips to
// a remote CAS; larger files are streamed from cas when their turn comes.
// w receives writes of up to 128 KiB, or whole files held in memory.
//
// A Directory message with duplicate or invalid names (empty, ".", "..",
// or containing '/' or NUL), an empty symlink target, or a blob of the
// wrong size is an error. Nothing is retried: on error, w has received a
// prefix of the NAR.
func Write(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, n Node, w io.Writer) error {
	if err := n.check(); err != nil {
		return err
	}
	nw := newNarWriter(w)
	defer nw.release()
	nw.raw(tokMagic)
	switch n.Type {
	case Symlink:
		nw.raw(tokSymlink)
		nw.str(n.Target)
		nw.raw(tokClose)
	case Regular:
		if err := writeStreamed(ctx, cas, nw, n.Executable, n.Digest); err != nil {
			return fmt.Errorf("nar: file contents %s: %w", n.Digest, err)
		}
	case Directory:
		t := &tree{fn: fn, cas: cas, dirs: make(map[digest.Digest][]entry)}
		if err := t.fetchDirectories(ctx, n.Digest); err != nil {
			return err
		}
		if err := t.write(ctx, nw, n.Digest); err != nil {
			return err
		}
	}
	return nw.flush()
}

// entry is a directory entry.
type entry struct {
	name   string
	typ    Type
	d      digest.Digest // of the Directory message or the file contents
	exec   bool
	target string
}

// tree holds the Directory messages of a tree, parsed.
type tree struct {
	fn   digest.Function
	cas  blobstore.BlobAccess
	dirs map[digest.Digest][]entry // entries sorted by name
}

// fetchDirectories reads the Directory messages of the tree under root,
// one level at a time, each level with up to fetchConcurrency Gets in
// flight.
func (t *tree) fetchDirectories(ctx context.Context, root digest.Digest) error {
	level := []digest.Digest{root}
	t.dirs[root] = nil
	for depth := 0; len(level) > 0; depth++ {
		if depth > maxDepth {
			return fmt.Errorf("nar: directories nested more than %d deep", maxDepth)
		}
		got := make([][]entry, len(level))
		if len(level) == 1 {
			var err error
			if got[0], err = t.fetchDirectory(ctx, level[0]); err != nil {
				return err
			}
		} else {
			g, gctx := errgroup.WithContext(ctx)
			g.SetLimit(fetchConcurrency)
			for i, d := range level {
				g.Go(func() error {
					var err error
					got[i], err = t.fetchDirectory(gctx, d)
					return err
				})
			}
			if err := g.Wait(); err != nil {
				return err
			}
		}
		var next []digest.Digest
		for i, d := range level {
			t.dirs[d] = got[i]
			for _, e := range got[i] {
				if _, ok := t.dirs[e.d]; e.typ == Directory && !ok {
					t.dirs[e.d] = nil
					next = append(next, e.d)
				}
			}
		}
		level = next
	}
	return nil
}

// fetchDirectory reads the Directory message d and returns its entries,
// sorted by name.
func (t *tree) fetchDirectory(ctx context.Context, d digest.Digest) ([]entry, error) {
	if d.Size() == 0 {
		// The empty directory is the empty blob, which CAS servers treat
		// as always present and need not store.
		return nil, nil
	}
	data, err := blobstore.GetBytes(ctx, t.cas, d, maxDirectorySize)
	if err != nil {
		return nil, fmt.Errorf("nar: read directory %s: %w", d, err)
	}
	var pd repb.Directory
	if err := proto.Unmarshal(data, &pd); err != nil {
		return nil, fmt.Errorf("nar: directory %s: %w", d, err)
	}
	es, err := entries(t.fn, &pd)
	if err != nil {
		return nil, fmt.Errorf("nar: directory %s: %w", d, err)
	}
	return es, nil
}

// entries returns the entries of pd sorted by the bytes of their names,
// checking that the names are valid NAR names and distinct.
func entries(fn digest.Function, pd *repb.Directory) ([]entry, error) {
	es := make([]entry, 0, len(pd.Files)+len(pd.Directories)+len(pd.Symlinks))
	for _, f := range pd.Files {
		d, err := digest.FromProto(fn, f.GetDigest())
		if err != nil {
			return nil, fmt.Errorf("file %q: %w", f.GetName(), err)
		}
		es = append(es, entry{name: f.GetName(), typ: Regular, d: d, exec: f.GetIsExecutable()})
	}
	for _, s := range pd.Directories {
		d, err := digest.FromProto(fn, s.GetDigest())
		if err != nil {
			return nil, fmt.Errorf("directory %q: %w", s.GetName(), err)
		}
		es = append(es, entry{name: s.GetName(), typ: Directory, d: d})
	}
	for _, s := range pd.Symlinks {
		if err := checkTarget(s.GetTarget()); err != nil {
			return nil, fmt.Errorf("symlink %q: %w", s.GetName(), err)
		}
		es = append(es, entry{name: s.GetName(), typ: Symlink, target: s.GetTarget()})
	}
	slices.SortFunc(es, func(a, b entry) int { return strings.Compare(a.name, b.name) })
	for i, e := range es {
		if err := checkName(e.name); err != nil {
			return nil, err
		}
		if i > 0 && es[i-1].name == e.name {
			return nil, fmt.Errorf("duplicate entry %q", e.name)
		}
	}
	return es, nil
}

// checkName reports whether name can name a NAR directory entry.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("invalid entry name %q", name)
	}
	return nil
}

// checkTarget reports whether target can be a symlink's target.
func checkTarget(target string) error {
	if target == "" || strings.IndexByte(target, 0) >= 0 {
		return fmt.Errorf("invalid symlink target %q", target)
	}
	return nil
}

// walk calls yield for every regular file under the directory d, in NAR
// order, until it returns false or ctx is done. It reports whether it was
// not stopped.
func (t *tree) walk(ctx context.Context, d digest.Digest, yield func(entry) bool) bool {
	if ctx.Err() != nil {
		return false
	}
	for _, e := range t.dirs[d] {
		switch e.typ {
		case Regular:
			if !yield(e) {
				return false
			}
		case Directory:
			if !t.walk(ctx, e.d, yield) {
				return false
			}
		}
	}
	return true
}

// prefetched reports whether the contents of the file e are fetched ahead.
func prefetched(e entry) bool { return e.d.Size() > 0 && e.d.Size() < prefetchBelow }

// slot is a file's contents fetched ahead.
type slot struct {
	done chan struct{}
	data []byte
	err  error
}

// write writes the NAR of the directory root while a prefetcher fetches
// the contents of small files ahead, in the order they are written.
func (t *tree) write(ctx context.Context, nw *narWriter, root digest.Digest) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // before wg.Wait: stops the prefetcher
	slots := make(chan *slot, prefetchBlobs)
	budget := semaphore.NewWeighted(prefetchBytes)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(slots)
		t.prefetch(ctx, root, slots, budget)
	}()
	w := &treeWriter{t: t, ctx: ctx, nw: nw, slots: slots, budget: budget}
	return w.dir(root, 0)
}

// prefetch fetches the contents of the small files under root, in NAR
// order, with up to fetchConcurrency Gets in flight and prefetchBytes
// held, and sends a slot for each to slots, in order. It stops when ctx is
// done.
func (t *tree) prefetch(ctx context.Context, root digest.Digest, slots chan<- *slot, budget *semaphore.Weighted) {
	type job struct {
		s *slot
		d digest.Digest
	}
	jobs := make(chan job)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(jobs)
	workers := 0
	t.walk(ctx, root, func(e entry) bool {
		if !prefetched(e) {
			return true
		}
		if budget.Acquire(ctx, e.d.Size()) != nil {
			return false
		}
		j := job{&slot{done: make(chan struct{})}, e.d}
		select {
		case slots <- j.s:
		case <-ctx.Done():
			return false
		}
		select {
		case jobs <- j: // An idle worker took it.
			return true
		default:
		}
		if workers < fetchConcurrency {
			workers++
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range jobs {
					j.s.data, j.s.err = getExact(ctx, t.cas, j.d)
					close(j.s.done)
				}
			}()
		}
		select {
		case jobs <- j:
			return true
		case <-ctx.Done():
			return false
		}
	})
}

// getExact reads the whole blob d, checking its size.
func getExact(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest) ([]byte, error) {
	data, err := blobstore.GetBytes(ctx, cas, d, d.Size())
	if err == nil && int64(len(data)) != d.Size() {
		err = fmt.Errorf("blob %s has %d bytes", d, len(data))
	}
	return data, err
}

// treeWriter writes the NAR of a tree whose small files are prefetched.
type treeWriter struct {
	t      *tree
	ctx    context.Context
	nw     *narWriter
	slots  <-chan *slot
	budget *semaphore.Weighted
	path   []string // names from the root to the entry being written
}

// where names the entry being written in errors.
func (w *treeWriter) where() string { return "/" + strings.Join(w.path, "/") }

func (w *treeWriter) dir(d digest.Digest, depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("nar: %s: directories nested more than %d deep", w.where(), maxDepth)
	}
	if err := w.ctx.Err(); err != nil {
		return err
	}
	nw := w.nw
	nw.raw(tokDirectory)
	for _, e := range w.t.dirs[d] {
		nw.raw(tokEntry)
		nw.str(e.name)
		nw.raw(tokNode)
		w.path = append(w.path, e.name)
		switch e.typ {
		case Directory:
			if err := w.dir(e.d, depth+1); err != nil {
				return err
			}
		case Symlink:
			nw.raw(tokSymlink)
			nw.str(e.target)
			nw.raw(tokClose)
		case Regular:
			if err := w.file(e); err != nil {
				return fmt.Errorf("nar: %s: file contents %s: %w", w.where(), e.d, err)
			}
		}
		w.path = w.path[:len(w.path)-1]
		nw.raw(tokClose)
		if nw.err != nil {
			return nw.err
		}
	}
	nw.raw(tokClose)
	return nw.err
}

func (w *treeWriter) file(e entry) error {
	if e.d.Size() == 0 {
		w.nw.file(e.exec, nil)
		return nil
	}
	if !prefetched(e) {
		return writeStreamed(w.ctx, w.t.cas, w.nw, e.exec, e.d)
	}
	var s *slot
	select {
	case s = <-w.slots:
	case <-w.ctx.Done():
		return w.ctx.Err()
	}
	if s == nil {
		// The prefetcher stopped early: only when ctx is done.
		return w.ctx.Err()
	}
	select {
	case <-s.done:
	case <-w.ctx.Done():
		return w.ctx.Err()
	}
	if s.err != nil {
		return s.err
	}
	w.nw.file(e.exec, s.data)
	w.budget.Release(e.d.Size())
	return w.nw.err
}

// writeStreamed writes a regular file whose contents it streams from cas.
func writeStreamed(ctx context.Context, cas blobstore.BlobAccess, nw *narWriter, exec bool, d digest.Digest) error {
	if d.Size() == 0 {
		nw.file(exec, nil)
		return nw.err
	}
	rc, err := cas.Get(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	nw.regular(exec, uint64(d.Size()))
	if err := nw.copyN(rc, d.Size()); err != nil {
		return err
	}
	nw.endRegular(uint64(d.Size()))
	return nw.err
}
