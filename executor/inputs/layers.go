package inputs

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Layers materialises the entries of one directory of input roots, such as
// the store paths in nix/store, once each, into directories that actions
// share rather than populate one by one. Each layer is a directory holding
// a single entry (a store path: a directory tree, a file or a symlink),
// keyed by its name and contents. An overlay of the layers an action needs
// (see sandbox.Instance.Overlay) then costs one mount, whatever the size of
// the closure, where hardlinking it costs a link per file and an rmdir per
// directory for every action: 1,000 store paths of 10,000 files took 1.3 s
// per action that way.
//
// Layers are read-only for sandboxed builds: their directories are owned
// by the executor with mode 0755, and their files are the Cache's
// read-only hardlinks. Layers in use are never removed; beyond the size
// bound, unused layers are removed least recently used first. A Layers is
// safe for concurrent use.
type Layers struct {
	m        *Materializer
	dir      string
	maxBytes int64
	wg       sync.WaitGroup

	mu     sync.Mutex
	closed bool
	seq    int
	bytes  int64
	layers map[string]*layer
	lru    list.List // of unused *layer, front is most recently released
	stats  LayerStats
}

// LayerStats are counters of a Layers.
type LayerStats struct {
	// Layers is the number of layers on disk and Bytes the size of their
	// files.
	Layers, Bytes int64
	// Hits counts layers an action found ready; Misses those it created
	// or waited for.
	Hits, Misses int64
	// Evictions counts layers removed to stay within the size bound.
	Evictions int64
}

// layer is one materialised entry. refs counts the LayerSets that hold
// it; while refs is 0 it is in the LRU list and may be evicted.
type layer struct {
	key   string
	dir   string
	ready chan struct{} // closed when created (or failed)
	err   error
	bytes int64
	refs  int
	elem  *list.Element
}

// NewLayers returns a Layers that keeps its layers in dir, which must be
// on the file system of m's Cache, bounded to about maxBytes of file
// contents (layers in use can exceed it). Whatever dir holds from an
// earlier run is removed in the background.
func NewLayers(m *Materializer, dir string, maxBytes int64) (*Layers, error) {
	if maxBytes <= 0 {
		return nil, fmt.Errorf("layers %s: max size must be positive", dir)
	}
	l := &Layers{m: m, dir: dir, maxBytes: maxBytes, layers: make(map[string]*layer)}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	// Layers of an earlier run are not indexed (their sizes and
	// completeness are unknown): move them aside and remove them.
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	if len(ents) > 0 {
		old := fmt.Sprintf("%s.old-%d", dir, time.Now().UnixNano())
		if err := os.Rename(dir, old); err != nil {
			return nil, fmt.Errorf("layers: %w", err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("layers: %w", err)
		}
		l.removeLater(old)
	}
	if olds, _ := filepath.Glob(dir + ".old-*"); len(olds) > 0 {
		for _, o := range olds {
			l.removeLater(o)
		}
	}
	return l, nil
}

func (l *Layers) removeLater(path string) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		os.RemoveAll(path)
	}()
}

// Close waits for background removals. Layers in use stay on disk.
func (l *Layers) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.wg.Wait()
	return nil
}

// Stats returns the counters.
func (l *Layers) Stats() LayerStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats
	s.Layers, s.Bytes = int64(len(l.layers)), l.bytes
	return s
}

// LayerSet is the layers of one input root, held until Release.
type LayerSet struct {
	l      *Layers
	layers []*layer
	once   sync.Once
}

// Dirs returns the layer directories, in the order of the entries' names.
// Each holds one entry of the split directory.
func (s *LayerSet) Dirs() []string {
	dirs := make([]string, len(s.layers))
	for i, ly := range s.layers {
		dirs[i] = ly.dir
	}
	return dirs
}

// Release lets the layers be evicted once no other LayerSet holds them.
func (s *LayerSet) Release() {
	s.once.Do(func() {
		l := s.l
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, ly := range s.layers {
			l.unrefLocked(ly)
		}
		l.evictLocked()
	})
}

func (l *Layers) unrefLocked(ly *layer) {
	ly.refs--
	if ly.refs == 0 && ly.err == nil && l.layers[ly.key] == ly {
		ly.elem = l.lru.PushFront(ly)
	}
}

// Materialize creates the input root root in dst as
// Materializer.Materialize does, except for the directory split of the
// tree (a clean relative path such as "nix/store"): dst receives split
// itself, empty, and each entry of split is a layer, created on first use.
// The LayerSet holds the layers until its Release. If the tree has no
// directory at split, the LayerSet is empty.
//
// Errors are those of Materializer.Materialize; paths in a
// *MissingBlobsError are relative to the input root.
func (l *Layers) Materialize(ctx context.Context, root digest.Digest, dst, split string, opts MaterializeOptions) (*LayerSet, MaterializeStats, error) {
	set := &LayerSet{l: l}
	stats, dir, err := l.m.materialize(ctx, root, dst, opts, split)
	if err != nil || dir == nil {
		return set, stats, err
	}
	type want struct {
		key   string
		build func(ctx context.Context, tmp string) (MaterializeStats, error)
	}
	var wants []want
	for _, f := range dir.files {
		wants = append(wants, want{
			key: fmt.Sprintf("f\x00%s\x00%s\x00%t", f.name, f.d, f.executable),
			build: func(ctx context.Context, tmp string) (MaterializeStats, error) {
				fetched, err := l.m.cache.link(ctx, f.d, f.executable, filepath.Join(tmp, f.name))
				s := MaterializeStats{Files: 1, Bytes: f.d.Size()}
				if fetched {
					s.FilesFetched = 1
				} else {
					s.FilesCached = 1
				}
				if blobstore.IsNotFound(err) {
					return s, &MissingBlobsError{Digests: []digest.Digest{f.d}, Paths: []string{f.name}}
				}
				return s, err
			},
		})
	}
	for _, d := range dir.dirs {
		wants = append(wants, want{
			key: fmt.Sprintf("d\x00%s\x00%s", d.name, d.d),
			build: func(ctx context.Context, tmp string) (MaterializeStats, error) {
				p := filepath.Join(tmp, d.name)
				if err := mkdir(p); err != nil {
					return MaterializeStats{}, err
				}
				lopts := opts
				lopts.Place = nil // a layer is shared: its files are the cache's
				s, _, err := l.m.materialize(ctx, d.d, p, lopts, "")
				s.Directories++
				var missing *MissingBlobsError
				if errors.As(err, &missing) {
					for i := range missing.Paths {
						missing.Paths[i] = join(d.name, missing.Paths[i])
					}
				}
				return s, err
			},
		})
	}
	for _, s := range dir.symlinks {
		wants = append(wants, want{
			key: fmt.Sprintf("l\x00%s\x00%s", s.name, s.target),
			build: func(ctx context.Context, tmp string) (MaterializeStats, error) {
				return MaterializeStats{Symlinks: 1}, os.Symlink(s.target, filepath.Join(tmp, s.name))
			},
		})
	}
	set.layers = make([]*layer, len(wants))
	var mu sync.Mutex
	var missing missingSet
	err = forEach(ctx, defaultParallelism, len(wants), func(ctx context.Context, i int) error {
		ly, s, err := l.acquire(ctx, wants[i].key, wants[i].build)
		mu.Lock()
		stats.add(s)
		mu.Unlock()
		var mb *MissingBlobsError
		if errors.As(err, &mb) {
			for j, d := range mb.Digests {
				missing.add(d, join(split, mb.Paths[j]))
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("input %s: %w", split, err)
		}
		set.layers[i] = ly
		return nil
	})
	if err == nil {
		err = missing.err()
	}
	if err != nil {
		l.mu.Lock()
		for _, ly := range set.layers {
			if ly != nil {
				l.unrefLocked(ly)
			}
		}
		l.mu.Unlock()
		set.layers = nil
		return set, stats, err
	}
	return set, stats, nil
}

// add adds the counts of o to s (not the durations).
func (s *MaterializeStats) add(o MaterializeStats) {
	s.Directories += o.Directories
	s.Files += o.Files
	s.Symlinks += o.Symlinks
	s.Bytes += o.Bytes
	s.FilesFetched += o.FilesFetched
	s.FilesCached += o.FilesCached
	s.DirectoriesFetched += o.DirectoriesFetched
}

// acquire returns the layer with key, referenced, creating it with make
// build in a temporary directory if it does not exist. Concurrent calls for the
// same key create it once; if the call creating it is canceled, the
// others try again.
func (l *Layers) acquire(ctx context.Context, key string, build func(context.Context, string) (MaterializeStats, error)) (*layer, MaterializeStats, error) {
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, MaterializeStats{}, errors.New("layers: closed")
		}
		if ly := l.layers[key]; ly != nil {
			ly.refs++
			if ly.elem != nil {
				l.lru.Remove(ly.elem)
				ly.elem = nil
			}
			select {
			case <-ly.ready:
				l.stats.Hits++
			default:
				l.stats.Misses++
			}
			l.mu.Unlock()
			select {
			case <-ly.ready:
			case <-ctx.Done():
				l.mu.Lock()
				l.unrefLocked(ly)
				l.mu.Unlock()
				return nil, MaterializeStats{}, ctx.Err()
			}
			if ly.err == nil {
				return ly, MaterializeStats{}, nil
			}
			l.mu.Lock()
			l.unrefLocked(ly)
			l.mu.Unlock()
			if errors.Is(ly.err, context.Canceled) || errors.Is(ly.err, context.DeadlineExceeded) {
				if ctx.Err() == nil {
					continue // the creating call was canceled
				}
			}
			return nil, MaterializeStats{}, ly.err
		}
		sum := sha256.Sum256([]byte(key))
		ly := &layer{key: key, dir: filepath.Join(l.dir, hex.EncodeToString(sum[:16])), ready: make(chan struct{}), refs: 1}
		l.layers[key] = ly
		l.stats.Misses++
		l.seq++
		tmp := filepath.Join(l.dir, "tmp-"+strconv.Itoa(l.seq))
		l.mu.Unlock()

		s, err := l.create(ctx, ly, tmp, build)
		l.mu.Lock()
		ly.err = err
		if err != nil {
			delete(l.layers, key)
			ly.refs--
		} else {
			// Entries count too, or layers of symlinks would be free.
			ly.bytes = s.Bytes + 4096*(1+s.Directories+s.Symlinks)
			l.bytes += ly.bytes
			l.evictLocked()
		}
		close(ly.ready)
		l.mu.Unlock()
		if err != nil {
			return nil, s, err
		}
		return ly, s, nil
	}
}

// create makes the layer in tmp and renames it into place.
func (l *Layers) create(ctx context.Context, ly *layer, tmp string, build func(context.Context, string) (MaterializeStats, error)) (MaterializeStats, error) {
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return MaterializeStats{}, fmt.Errorf("layers: %w", err)
	}
	s, err := build(ctx, tmp)
	if err == nil {
		// A layer of an earlier process may still be there (it is being
		// removed), and overlayfs needs the layer's root not to be
		// writable by the build: it is 0755, owned by the executor.
		if err = os.Rename(tmp, ly.dir); err != nil {
			err = fmt.Errorf("layers: %w", err)
		}
	}
	if err != nil {
		l.removeLater(tmp)
	}
	return s, err
}

// evictLocked removes unused layers, least recently used first, while the
// layers exceed the size bound.
func (l *Layers) evictLocked() {
	for l.bytes > l.maxBytes && l.lru.Len() > 0 {
		ly := l.lru.Remove(l.lru.Back()).(*layer)
		ly.elem = nil
		delete(l.layers, ly.key)
		l.bytes -= ly.bytes
		l.stats.Evictions++
		l.seq++
		// Rename first, so a new layer with the same key can be created
		// at once.
		dead := filepath.Join(l.dir, "dead-"+strconv.Itoa(l.seq))
		if err := os.Rename(ly.dir, dead); err != nil {
			dead = ly.dir
		}
		l.removeLater(dead)
	}
}
