package pathinfo

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"

	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// Lister is a Store whose paths can be enumerated.
type Lister interface {
	// List calls yield with the info of every known path, in store path
	// order, until yield returns an error (which List returns).
	List(ctx context.Context, yield func(*storepb.PathInfo) error) error
}

// Indexed is a Store that also records, in a local index file, the
// store paths put through it, so that they can be listed (Tvix's
// PathInfoService.List). The records themselves stay in the wrapped
// store; the index only names them, so a listed path whose record has
// been evicted is skipped. Paths put before the index existed, or by
// another process on a shared store, are not listed. The file is
// appended to, one store path per line; a torn last line after a crash
// is ignored (that path is still stored, just not listed).
type Indexed struct {
	Store
	mu    sync.Mutex
	f     *os.File
	known map[string]bool
}

// NewIndexed wraps s with the index file at path, created if needed.
func NewIndexed(s Store, path string) (*Indexed, error) {
	known := map[string]bool{}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("pathinfo index: %w", err)
	}
	lines := strings.Split(string(data), "\n")
	if n := len(lines); n > 0 && lines[n-1] != "" {
		lines = lines[:n-1] // torn
		// The next append must start on a line of its own.
		if err := os.Truncate(path, int64(strings.LastIndexByte(string(data), '\n')+1)); err != nil {
			return nil, fmt.Errorf("pathinfo index: %w", err)
		}
	}
	for _, l := range lines {
		if validStorePath(l) == nil {
			known[l] = true
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("pathinfo index: %w", err)
	}
	return &Indexed{Store: s, f: f, known: known}, nil
}

// Put stores infos in the wrapped store, then records their paths.
func (s *Indexed) Put(ctx context.Context, infos []*storepb.PathInfo) error {
	if err := s.Store.Put(ctx, infos); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for _, info := range infos {
		if !s.known[info.StorePath] {
			b.WriteString(info.StorePath + "\n")
		}
	}
	if b.Len() == 0 {
		return nil
	}
	if _, err := s.f.WriteString(b.String()); err != nil {
		return fmt.Errorf("pathinfo index: %w", err)
	}
	for _, info := range infos {
		s.known[info.StorePath] = true
	}
	return nil
}

// List yields the infos of the indexed paths that the store still has.
func (s *Indexed) List(ctx context.Context, yield func(*storepb.PathInfo) error) error {
	s.mu.Lock()
	paths := make([]string, 0, len(s.known))
	for p := range s.known {
		paths = append(paths, p)
	}
	s.mu.Unlock()
	slices.Sort(paths)
	for len(paths) > 0 {
		batch := paths[:min(len(paths), MaxBatch)]
		paths = paths[len(batch):]
		infos, err := s.Store.Get(ctx, batch)
		if err != nil {
			return err
		}
		for _, p := range batch {
			if info, ok := infos[p]; ok {
				if err := yield(info); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Close closes the index file.
func (s *Indexed) Close() error { return s.f.Close() }
