package blobstore_test

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/blobstore/internal/redistest"
	"tvixfarm/cas/digest"
)

var redisPrefixes atomic.Int64

// openRedis returns a Redis store on addr under a key prefix of its own, so
// that stores sharing a server start empty, and closes it at the end of the
// test.
func openRedis(t testing.TB, kind blobstore.Kind, addr string, opts blobstore.RedisOptions) blobstore.BlobAccess {
	t.Helper()
	opts.Addr = addr
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = fmt.Sprintf("test%d:", redisPrefixes.Add(1))
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	ba := blobstore.NewRedis(kind, opts)
	t.Cleanup(func() { closeStore(ba) })
	return ba
}

func TestRedisConformance(t *testing.T) {
	// The conformance runs are independent of each other and bound by the
	// file system more than the CPU; timing-sensitive tests are not parallel.
	t.Parallel()
	srv := redistest.Start(t)
	for _, kind := range []blobstore.Kind{blobstore.CAS, blobstore.AC} {
		t.Run(kind.String(), func(t *testing.T) {
			blobstoretest.RunConformance(t, kind, func(t *testing.T) blobstore.BlobAccess {
				return openRedis(t, kind, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 32 << 20})
			})
		})
	}
}

func TestRedisMaxBlobSize(t *testing.T) {
	srv := redistest.Start(t)
	rng := blobstoretest.Rand(t)
	ctx := context.Background()

	cas := openRedis(t, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1000})
	for _, fn := range digest.Functions {
		exact := blobstoretest.RandomBlob(rng, fn, 1000)
		blobstoretest.MustPut(t, cas, exact.Digest, exact.Data)
		blobstoretest.WantBlob(t, cas, exact.Digest, exact.Data)
		for _, n := range []int{1001, 5 << 20} {
			big := blobstoretest.RandomBlob(rng, fn, n)
			for _, rd := range blobstoretest.Readers {
				err := cas.Put(ctx, big.Digest, rd.New(big.Data))
				blobstoretest.WantCode(t, err, codes.ResourceExhausted, fmt.Sprintf("Put of %d bytes over max_blob_size 1000", n))
				blobstoretest.WantAbsent(t, cas, big.Digest)
			}
		}
	}

	ac := openRedis(t, blobstore.AC, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1000})
	action := blobstoretest.RandomBlob(rng, digest.SHA256, 50).Digest
	old := blobstoretest.RandomBytes(rng, 1000)
	blobstoretest.MustPut(t, ac, action, old)
	for _, rd := range blobstoretest.Readers {
		err := ac.Put(ctx, action, rd.New(make([]byte, 1001)))
		blobstoretest.WantCode(t, err, codes.ResourceExhausted, "action cache Put over max_blob_size")
		blobstoretest.WantBlob(t, ac, action, old)
		fresh := blobstoretest.RandomBlob(rng, digest.SHA256, 50).Digest
		err = ac.Put(ctx, fresh, rd.New(make([]byte, 1001)))
		blobstoretest.WantCode(t, err, codes.ResourceExhausted, "action cache Put over max_blob_size")
		blobstoretest.WantAbsent(t, ac, fresh)
	}
}

// TestRedisCorruptValueNotServed overwrites the value Redis holds for a
// blob and checks that Get verifies it: a miss, and the key is dropped.
func TestRedisCorruptValueNotServed(t *testing.T) {
	srv := redistest.Start(t)
	rng := blobstoretest.Rand(t)
	ctx := context.Background()
	raw := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer raw.Close()
	for i, fn := range digest.Functions {
		prefix := fmt.Sprintf("corrupt%d:", i)
		ba := openRedis(t, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1 << 20, KeyPrefix: prefix})
		b := blobstoretest.RandomBlob(rng, fn, 5000)
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		keys, err := raw.Keys(ctx, prefix+"*").Result()
		if err != nil || len(keys) != 1 {
			t.Fatalf("KEYS %s* = %v, %v; want the one key of the blob", prefix, keys, err)
		}
		bad := bytes.Clone(b.Data)
		bad[100] ^= 1
		if err := raw.Set(ctx, keys[0], bad, 0).Err(); err != nil {
			t.Fatal(err)
		}
		_, err = ba.Get(ctx, b.Digest)
		blobstoretest.WantCode(t, err, codes.NotFound, "Get of a corrupt value")
		if n, err := raw.Exists(ctx, keys[0]).Result(); err != nil || n != 0 {
			t.Fatalf("corrupt key still exists (EXISTS = %d, %v)", n, err)
		}
		blobstoretest.WantAbsent(t, ba, b.Digest)
	}
}

func TestRedisTTL(t *testing.T) {
	srv := redistest.Start(t)
	raw := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer raw.Close()
	ctx := context.Background()
	ba := openRedis(t, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1 << 20, KeyPrefix: "ttl:", TTL: time.Hour})
	b := blobstoretest.NewBlob(digest.SHA256, []byte("expires"))
	blobstoretest.MustPut(t, ba, b.Digest, b.Data)
	keys, err := raw.Keys(ctx, "ttl:*").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("KEYS = %v, %v", keys, err)
	}
	if ttl := raw.PTTL(ctx, keys[0]).Val(); ttl <= 0 || ttl > time.Hour {
		t.Fatalf("PTTL after Put = %v, want in (0, 1h]", ttl)
	}
	// FindMissing refreshes the TTL.
	raw.Expire(ctx, keys[0], time.Minute)
	if !blobstoretest.Present(t, ba, b.Digest) {
		t.Fatal("blob missing")
	}
	if ttl := raw.PTTL(ctx, keys[0]).Val(); ttl <= time.Minute {
		t.Fatalf("PTTL after FindMissing = %v, want refreshed to about 1h", ttl)
	}
}

// wantUnavailableFast runs op and checks that it fails with Unavailable
// within limit.
func wantUnavailableFast(t *testing.T, what string, limit time.Duration, op func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	err := op(ctx)
	elapsed := time.Since(start)
	blobstoretest.WantCode(t, err, codes.Unavailable, what)
	if elapsed > limit {
		t.Fatalf("%s took %v to fail, limit %v", what, elapsed, limit)
	}
	t.Logf("%s failed after %v: %v", what, elapsed.Round(time.Millisecond), err)
}

func TestRedisServerGone(t *testing.T) {
	const timeout = 300 * time.Millisecond
	// Every operation, with its retries, must give up well within this.
	const limit = 3 * time.Second
	rng := blobstoretest.Rand(t)
	b := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
	other := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
	ops := []struct {
		name string
		op   func(ba blobstore.BlobAccess) func(ctx context.Context) error
	}{
		{"Get", func(ba blobstore.BlobAccess) func(ctx context.Context) error {
			return func(ctx context.Context) error {
				_, err := blobstoretest.ReadBlob(ctx, ba, b.Digest)
				return err
			}
		}},
		{"Put", func(ba blobstore.BlobAccess) func(ctx context.Context) error {
			return func(ctx context.Context) error {
				return ba.Put(ctx, other.Digest, bytes.NewReader(other.Data))
			}
		}},
		{"FindMissing", func(ba blobstore.BlobAccess) func(ctx context.Context) error {
			return func(ctx context.Context) error {
				_, err := ba.FindMissing(ctx, []digest.Digest{b.Digest, other.Digest})
				return err
			}
		}},
	}

	t.Run("killed", func(t *testing.T) {
		srv := redistest.Start(t)
		ba := openRedis(t, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1 << 20, Timeout: timeout, DialTimeout: timeout})
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		blobstoretest.WantBlob(t, ba, b.Digest, b.Data)
		srv.Stop()
		for _, o := range ops {
			wantUnavailableFast(t, o.name+" on a killed server", limit, o.op(ba))
		}
	})

	t.Run("hung", func(t *testing.T) {
		srv := redistest.Start(t)
		ba := openRedis(t, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 1 << 20, Timeout: timeout, DialTimeout: timeout})
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		if err := srv.Pause(); err != nil {
			t.Fatal(err)
		}
		for _, o := range ops {
			wantUnavailableFast(t, o.name+" on a hung server", limit, o.op(ba))
		}
		if err := srv.Resume(); err != nil {
			t.Fatal(err)
		}
		// The store recovers once the server answers again.
		deadline := time.Now().Add(10 * time.Second)
		for {
			data, err := blobstoretest.ReadBlob(context.Background(), ba, b.Digest)
			if err == nil {
				if !bytes.Equal(data, b.Data) {
					t.Fatal("wrong data after the server resumed")
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("store did not recover after the server resumed: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// The Put attempted while the server hung did not store the blob
		// half-way, whether or not it reached the server.
		if data, err := blobstoretest.ReadBlob(context.Background(), ba, other.Digest); err == nil && !bytes.Equal(data, other.Data) {
			t.Fatal("the Put attempted while the server hung stored wrong data")
		}
	})
}
