package farm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/internal/config"
)

// Embedded is an all-in-one farm running inside another program, such as
// `tvixfarm build` without --farm, listening on a free loopback port.
type Embedded struct {
	// Addr is the farm's gRPC address.
	Addr string
	f    *Farm
	stop context.CancelFunc
	done chan error
	once sync.Once
	err  error
}

// embeddedPlatformGrace is the embedded farm's scheduler.platform_grace
// unless the configuration sets one.
const embeddedPlatformGrace = 5 * time.Second

// StartEmbedded starts cfg (its listen address and metrics listener are
// replaced: a free loopback port, no metrics, no binary cache) with every
// role, and returns once it serves.
func StartEmbedded(cfg *config.Config, log *slog.Logger) (*Embedded, error) {
	c := *cfg
	c.Listen = "127.0.0.1:0"
	c.MetricsListen = ""
	noHTTP := ""
	c.BinaryCache.Listen = &noHTTP
	c.Role = "all"
	if c.Scheduler.PlatformGrace == 0 {
		// The only worker is in this process and registers at once: an
		// action no worker can run fails after seconds, not the 30 s a
		// cluster gives its executors to start.
		c.Scheduler.PlatformGrace = config.Duration(embeddedPlatformGrace)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	f, err := newFarm(ctx, &c, log, true)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("starting the embedded farm: %w", err)
	}
	e := &Embedded{Addr: f.Addr(), f: f, stop: cancel, done: make(chan error, 1)}
	go func() { e.done <- f.Serve(ctx) }()
	return e, nil
}

// Farm returns the running farm.
func (e *Embedded) Farm() *Farm { return e.f }

// LocalStores returns the farm's own CAS and path-info store, for a client
// in the same process (the coordinator of `tvixfarm build`): the stores
// and checks its gRPC services use, without a loopback round trip. The CAS
// has REAPI's always-present empty blob, as over gRPC
// (blobstore.WithEmptyBlob).
func (e *Embedded) LocalStores() (blobstore.BlobAccess, pathinfo.Store) {
	return blobstore.WithEmptyBlob(e.f.stores.Default.CAS), e.f.paths
}

// Close stops the farm and waits for it to finish.
// Closing it again returns the first Close's result.
func (e *Embedded) Close() error {
	e.once.Do(func() {
		e.stop()
		e.err = <-e.done
		if errors.Is(e.err, context.Canceled) {
			e.err = nil
		}
	})
	return e.err
}
