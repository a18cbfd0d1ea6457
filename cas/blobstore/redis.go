package blobstore

import (
	"context"
	"errors"
	"io"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// RedisOptions configures a Redis BlobAccess.
type RedisOptions struct {
	Addr     string
	Username string
	Password string
	DB       int
	// KeyPrefix is prepended to every key, so several farms or instances
	// can share one Redis.
	KeyPrefix string
	// MaxBlobSize bounds the blobs stored; larger ones are refused with
	// ResourceExhausted (put a size-aware store in front for those).
	MaxBlobSize int64
	// Timeout bounds every Redis command; DialTimeout every connection.
	Timeout     time.Duration
	DialTimeout time.Duration
	// TTL expires entries after this long; 0 keeps them until Redis evicts
	// them under its own maxmemory policy.
	TTL time.Duration
}

// NewRedis returns a BlobAccess backed by Redis, for small blobs and for an
// action cache shared by several gateways. go-redis keeps a pool of
// connections and reconnects on its own; every command has a deadline.
func NewRedis(kind Kind, opts RedisOptions) BlobAccess {
	c := redis.NewClient(&redis.Options{
		Addr:         opts.Addr,
		Username:     opts.Username,
		Password:     opts.Password,
		DB:           opts.DB,
		DialTimeout:  opts.DialTimeout,
		ReadTimeout:  opts.Timeout,
		WriteTimeout: opts.Timeout,
		MaxRetries:   2,
	})
	prefix := opts.KeyPrefix + "cas:"
	if kind == AC {
		prefix = opts.KeyPrefix + "ac:"
	}
	return &redisStore{kind: kind, c: c, prefix: prefix, opts: opts}
}

type redisStore struct {
	kind   Kind
	c      *redis.Client
	prefix string
	opts   RedisOptions
}

func (s *redisStore) key(d digest.Digest) string {
	return s.prefix + d.Function().String() + ":" + d.Hex() + ":" + strconv.FormatInt(d.Size(), 10)
}

func (s *redisStore) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	if s.opts.Timeout > 0 {
		return context.WithTimeout(ctx, s.opts.Timeout)
	}
	return ctx, func() {}
}

func (s *redisStore) err(err error, op string, d digest.Digest) error {
	if errors.Is(err, context.Canceled) {
		return status.FromContextError(err).Err()
	}
	return status.Errorf(codes.Unavailable, "redis %s %s: %v", op, d, err)
}

func (s *redisStore) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	ctx, cancel := s.ctx(ctx)
	defer cancel()
	data, err := s.c.Get(ctx, s.key(d)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, NotFound(s.kind, d)
	} else if err != nil {
		return nil, s.err(err, "GET", d)
	}
	if s.kind == CAS {
		if err := d.Verify(data); err != nil {
			s.c.Del(ctx, s.key(d))
			return nil, NotFound(s.kind, d)
		}
	}
	return newBytesReadCloser(data), nil
}

func (s *redisStore) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	if s.kind == CAS && d.Size() > s.opts.MaxBlobSize {
		return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the redis store's max_blob_size (%d bytes)", d, s.opts.MaxBlobSize)
	}
	data, err := s.kind.readAll(d, r)
	if err != nil {
		return err
	}
	if int64(len(data)) > s.opts.MaxBlobSize {
		return status.Errorf(codes.ResourceExhausted, "entry %s is larger than the redis store's max_blob_size (%d bytes)", d, s.opts.MaxBlobSize)
	}
	ctx, cancel := s.ctx(ctx)
	defer cancel()
	if err := s.c.Set(ctx, s.key(d), data, s.opts.TTL).Err(); err != nil {
		return s.err(err, "SET", d)
	}
	return nil
}

// FindMissing uses TOUCH, which reports existence and, unlike EXISTS,
// refreshes the key for Redis's LRU eviction; one pipelined round trip.
func (s *redisStore) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	if len(ds) == 0 {
		return nil, nil
	}
	ctx, cancel := s.ctx(ctx)
	defer cancel()
	pipe := s.c.Pipeline()
	cmds := make([]*redis.IntCmd, len(ds))
	for i, d := range ds {
		cmds[i] = pipe.Touch(ctx, s.key(d))
		if s.opts.TTL > 0 {
			pipe.Expire(ctx, s.key(d), s.opts.TTL)
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, s.err(err, "TOUCH", ds[0])
	}
	var missing []digest.Digest
	for i, c := range cmds {
		if c.Val() == 0 {
			missing = append(missing, ds[i])
		}
	}
	return missing, nil
}

// Close closes the connection pool.
func (s *redisStore) Close() error { return s.c.Close() }
