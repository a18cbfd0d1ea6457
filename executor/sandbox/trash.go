package sandbox

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
)

// trash removes directories in the background: rmdir costs ~2 ms per
// directory on the disks here, so an action's tree is renamed into the
// trash (one syscall) and deleted off the critical path. Whatever is left
// when the process dies is removed at the next start.
type trash struct {
	dir string
	log *slog.Logger
	mu  sync.Mutex
	n   int
	ch  chan string
}

func newTrash(ctx context.Context, dir string, log *slog.Logger, wg *sync.WaitGroup) (*trash, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	t := &trash{dir: dir, log: log, ch: make(chan string, 4096)}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, e := range ents {
			t.remove(filepath.Join(dir, e.Name()))
		}
		for {
			select {
			case p := <-t.ch:
				t.remove(p)
			case <-ctx.Done():
				for {
					select {
					case p := <-t.ch:
						t.remove(p)
					default:
						return
					}
				}
			}
		}
	}()
	return t, nil
}

// name is a new name in the trash for p.
func (t *trash) name(p string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n++
	return filepath.Join(t.dir, fmt.Sprintf("%s.%d", filepath.Base(p), t.n))
}

// move moves p into the trash and schedules its removal. Unlike put, it
// fails if p cannot be moved: then p is still there.
func (t *trash) move(p string) error {
	dst := t.name(p)
	if err := os.Rename(p, dst); err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	t.queue(dst)
	return nil
}

func (t *trash) queue(dst string) {
	select {
	case t.ch <- dst:
	default:
		t.remove(dst) // the queue is full: remove on the caller's time
	}
}

// put moves p into the trash and schedules its removal.
func (t *trash) put(p string) {
	dst := t.name(p)
	if err := os.Rename(p, dst); err != nil {
		if os.IsNotExist(err) {
			return
		}
		dst = p
	}
	t.queue(dst)
}

func (t *trash) remove(p string) {
	if err := os.RemoveAll(p); err != nil {
		t.log.Warn("sandbox: cannot remove directory", "path", p, "err", err)
	}
}
