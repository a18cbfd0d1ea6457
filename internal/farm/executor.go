package farm

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/executor"
	"tvixfarm/executor/inputs"
	"tvixfarm/executor/sandbox"
	"tvixfarm/internal/config"
)

// closerFunc adapts a function to io.Closer.
type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// DefaultReuse is executor.reuse when the configuration does not set it.
const DefaultReuse = 100

// NewExecutor builds the executor role from its configuration: the sandbox
// backend (runc by default, in dataDir/executor/sandbox), the input cache
// (dataDir/executor/cache, on the same file system so inputs are
// hardlinked) and the executor itself, reading from and writing to cas.
// What needs closing is appended to f.closers.
func (f *Farm) newExecutor(cfg config.Executor, dataDir string, cas blobstore.BlobAccess, log *slog.Logger) (*executor.Executor, error) {
	dir := filepath.Join(dataDir, "executor")
	slots := cfg.Slots
	if slots <= 0 {
		slots = runtime.NumCPU()
	}
	var sb sandbox.Sandbox
	switch cfg.Sandbox {
	case "", "runc":
		prewarm := slots
		if cfg.Prewarm != nil {
			prewarm = *cfg.Prewarm
		}
		reuse := DefaultReuse
		if cfg.Reuse != nil {
			reuse = *cfg.Reuse
		}
		r, err := sandbox.NewRunc(sandbox.RuncOptions{
			Dir:     filepath.Join(dir, "sandbox"),
			Prewarm: prewarm,
			Reuse:   reuse,
			// Nix builds run in /build and write to /nix/store, which is an
			// overlay of their store paths.
			Seed:      []sandbox.Shape{{Layout: sandbox.Chroot, Writable: []string{"build", "nix/store"}, Overlay: "nix/store"}},
			Defaults:  sandbox.Limits{MemoryBytes: int64(cfg.Limits.Memory), Pids: cfg.Limits.Pids, CPUs: cfg.Limits.CPUs},
			HostPaths: cfg.HostPaths,
			Logger:    log,
		})
		if err != nil {
			if errors.Is(err, sandbox.ErrNotStatic) || errors.Is(err, sandbox.ErrNoSeccomp) {
				return nil, fmt.Errorf("executor: %w (or set executor.sandbox: unsandboxed for development)", err)
			}
			return nil, fmt.Errorf("executor: %w (run `serve --role storage` for storage only, or set executor.sandbox: unsandboxed for development)", err)
		}
		sb = r
	case "unsandboxed":
		u, err := sandbox.NewUnsandboxed(filepath.Join(dir, "unsandboxed"), log)
		if err != nil {
			return nil, fmt.Errorf("executor: %w", err)
		}
		sb = u
	}
	f.closers = append(f.closers, closerFunc(sb.Close))
	cacheSize := int64(cfg.CacheSize)
	if cacheSize <= 0 {
		cacheSize = 10 << 30
	}
	cache, err := inputs.NewCache(filepath.Join(dir, "cache"), cacheSize, cas)
	if err != nil {
		return nil, fmt.Errorf("executor: %w", err)
	}
	f.closers = append(f.closers, cache)
	mat := inputs.NewMaterializer(cache, 256<<20)
	var layers *inputs.Layers
	if cfg.Sandbox != "unsandboxed" {
		// Store paths are materialised once each; their files are links
		// to the cache, so the layers take a share of its bound.
		if layers, err = inputs.NewLayers(mat, filepath.Join(dir, "layers"), cacheSize/2); err != nil {
			return nil, fmt.Errorf("executor: %w", err)
		}
		f.closers = append(f.closers, layers)
	}
	e := executor.New(executor.Config{
		Name:           cfg.Name,
		Systems:        cfg.Systems,
		Features:       cfg.Features,
		Slots:          slots,
		DefaultTimeout: time.Duration(cfg.DefaultTimeout),
		MaxTimeout:     time.Duration(cfg.MaxTimeout),
		Dir:            filepath.Join(dir, "work"),
		Layers:         layers,
		PlainREAPI:     cfg.PlainREAPI,
		Logger:         log,
	}, cas, mat, sb)
	if err := e.Init(); err != nil {
		return nil, err
	}
	log.Info("executor ready", "slots", slots, "sandbox", cmp.Or(cfg.Sandbox, "runc"), "platform", e.Platform().String())
	return e, nil
}
