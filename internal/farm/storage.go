package farm

import (
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/internal/config"
)

// Default read verification of the disk backend.
const (
	defaultVerifyBelow      = 1 << 20
	defaultVerifySampleRate = 0.01
	defaultPackBelow        = 64 << 10
)

// NewBackend builds the storage stack a config.Backend describes, for kind.
// Relative disk paths are resolved against dataDir. Closers of the backends
// that hold resources (locks, connections) are appended to closers.
func NewBackend(kind blobstore.Kind, b config.Backend, dataDir string, log *slog.Logger, closers *[]io.Closer) (blobstore.BlobAccess, error) {
	switch {
	case b.Disk != nil:
		d := b.Disk
		path := d.Path
		if !filepath.IsAbs(path) {
			path = filepath.Join(dataDir, path)
		}
		opts := blobstore.DiskOptions{
			MaxSize:          int64(d.MaxSize),
			Fsync:            d.Fsync,
			VerifyBelow:      defaultVerifyBelow,
			VerifySampleRate: defaultVerifySampleRate,
			PackBelow:        defaultPackBelow,
			PackSize:         int64(d.PackSize),
			Logger:           log,
		}
		opts.DirectIO = d.DirectIO == nil || *d.DirectIO
		if d.PackBelow != nil {
			opts.PackBelow = int64(*d.PackBelow)
		}
		if d.VerifyBelow != nil {
			opts.VerifyBelow = int64(*d.VerifyBelow)
		}
		if d.VerifySampleRate != nil {
			opts.VerifySampleRate = *d.VerifySampleRate
		}
		start := time.Now()
		ba, err := blobstore.NewDisk(kind, path, opts)
		if err != nil {
			return nil, err
		}
		log.Info("disk store opened", "kind", kind.String(), "path", path, "max_size", int64(d.MaxSize), "fsync", d.Fsync, "direct_io", opts.DirectIO, "took", time.Since(start).Round(time.Millisecond))
		*closers = append(*closers, ba.(io.Closer))
		return ba, nil
	case b.Memory != nil:
		return blobstore.NewMemory(kind, int64(b.Memory.MaxSize)), nil
	case b.Redis != nil:
		r := b.Redis
		ba := blobstore.NewRedis(kind, blobstore.RedisOptions{
			Addr: r.Addr, Username: r.Username, Password: r.Password, DB: r.DB,
			KeyPrefix: r.KeyPrefix, MaxBlobSize: int64(r.MaxBlobSize),
			Timeout: time.Duration(r.Timeout), DialTimeout: time.Duration(r.DialTimeout), TTL: time.Duration(r.TTL),
		})
		*closers = append(*closers, ba.(io.Closer))
		return ba, nil
	case b.Tiered != nil:
		local, err := NewBackend(kind, b.Tiered.Local, dataDir, log, closers)
		if err != nil {
			return nil, err
		}
		remote, err := NewBackend(kind, b.Tiered.Remote, dataDir, log, closers)
		if err != nil {
			return nil, err
		}
		return blobstore.NewTiered(local, remote), nil
	}
	return nil, fmt.Errorf("empty storage backend")
}

// NewStores builds the stores for every instance the storage config names.
func NewStores(s config.Storage, dataDir string, log *slog.Logger, closers *[]io.Closer) (*blobstore.Instances, error) {
	build := func(cas, ac config.Backend) (blobstore.Stores, error) {
		c, err := NewBackend(blobstore.CAS, cas, dataDir, log, closers)
		if err != nil {
			return blobstore.Stores{}, fmt.Errorf("cas: %w", err)
		}
		a, err := NewBackend(blobstore.AC, ac, dataDir, log, closers)
		if err != nil {
			return blobstore.Stores{}, fmt.Errorf("action cache: %w", err)
		}
		return blobstore.Stores{
			CAS: blobstore.NewMetricsBlobAccess(c, "cas"),
			AC:  blobstore.NewMetricsBlobAccess(a, "action_cache"),
		}, nil
	}
	def, err := build(s.CAS, s.ActionCache)
	if err != nil {
		return nil, err
	}
	in := &blobstore.Instances{Default: def, ByName: map[string]blobstore.Stores{}}
	for name, is := range s.Instances {
		st, err := build(is.CAS, is.ActionCache)
		if err != nil {
			return nil, fmt.Errorf("instance %q: %w", name, err)
		}
		in.ByName[name] = st
	}
	return in, nil
}
