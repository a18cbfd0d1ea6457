package blobstore_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/blobstore/internal/redistest"
	"tvixfarm/cas/digest"
)

// benchBackend makes a fresh, empty CAS store for one run of a benchmark.
type benchBackend struct {
	name string
	new  func(b *testing.B) blobstore.BlobAccess
}

// benchBackends returns the backends to benchmark: memory, disk (a file per
// blob), disk with small blobs in pack files, and Redis if a redis-server
// is installed (one server for the whole benchmark function, a key prefix
// per run). The stores are bounded to 1 GiB and evict beyond.
func benchBackends(b *testing.B) []benchBackend {
	backends := []benchBackend{
		{"memory", func(b *testing.B) blobstore.BlobAccess {
			return blobstore.NewMemory(blobstore.CAS, 1<<30)
		}},
		{"disk", func(b *testing.B) blobstore.BlobAccess {
			return openDisk(b, blobstore.CAS, b.TempDir(), blobstore.DiskOptions{MaxSize: 1 << 30})
		}},
		{"disk-packed", func(b *testing.B) blobstore.BlobAccess {
			return openDisk(b, blobstore.CAS, b.TempDir(), blobstore.DiskOptions{MaxSize: 1 << 30, PackBelow: 64 << 10})
		}},
		// The default configuration: packs for small blobs, O_DIRECT for large ones.
		{"disk-default", func(b *testing.B) blobstore.BlobAccess {
			return openDisk(b, blobstore.CAS, b.TempDir(), blobstore.DiskOptions{MaxSize: 1 << 30, PackBelow: 64 << 10, DirectIO: true, VerifyBelow: 1 << 20, VerifySampleRate: 0.01})
		}},
	}
	if redistest.Available() {
		srv := redistest.Start(b, "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru")
		backends = append(backends, benchBackend{"redis", func(b *testing.B) blobstore.BlobAccess {
			return openRedis(b, blobstore.CAS, srv.Addr, blobstore.RedisOptions{MaxBlobSize: 32 << 20, Timeout: 30 * time.Second})
		}})
	} else {
		backends = append(backends, benchBackend{"redis", func(b *testing.B) blobstore.BlobAccess {
			redistest.Start(b) // skips, or fails if TVIXFARM_REQUIRE_REDIS is set
			return nil
		}})
	}
	return backends
}

// distinctBlobs returns n different random blobs of size bytes.
func distinctBlobs(b *testing.B, n, size int) []blobstoretest.Blob {
	rng := blobstoretest.Rand(b)
	blobs := make([]blobstoretest.Blob, n)
	for i := range blobs {
		blobs[i] = blobstoretest.RandomBlob(rng, digest.SHA256, size)
	}
	return blobs
}

func BenchmarkPutSmall(b *testing.B) {
	for _, be := range benchBackends(b) {
		b.Run(be.name, func(b *testing.B) {
			ba := be.new(b)
			blobs := distinctBlobs(b, b.N, 100)
			ctx := context.Background()
			b.SetBytes(100)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := ba.Put(ctx, blobs[i].Digest, bytes.NewReader(blobs[i].Data)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkGetSmall(b *testing.B) {
	for _, be := range benchBackends(b) {
		b.Run(be.name, func(b *testing.B) {
			ba := be.new(b)
			blobs := distinctBlobs(b, 1000, 100)
			ctx := context.Background()
			for _, bl := range blobs {
				blobstoretest.MustPut(b, ba, bl.Digest, bl.Data)
			}
			buf := make([]byte, 4096)
			b.SetBytes(100)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				bl := blobs[i%len(blobs)]
				rc, err := ba.Get(ctx, bl.Digest)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.ReadFull(rc, buf[:100])
				if err != nil || n != 100 {
					b.Fatalf("read %d bytes: %v", n, err)
				}
				if _, err := rc.Read(buf); err != io.EOF {
					b.Fatalf("after the blob: %v, want io.EOF", err)
				}
				rc.Close()
			}
		})
	}
}

func BenchmarkFindMissing1000(b *testing.B) {
	for _, be := range benchBackends(b) {
		b.Run(be.name, func(b *testing.B) {
			ba := be.new(b)
			blobs := distinctBlobs(b, 1000, 100)
			ctx := context.Background()
			ds := make([]digest.Digest, len(blobs))
			for i, bl := range blobs {
				ds[i] = bl.Digest
				if i%2 == 0 {
					blobstoretest.MustPut(b, ba, bl.Digest, bl.Data)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				missing, err := ba.FindMissing(ctx, ds)
				if err != nil {
					b.Fatal(err)
				}
				if len(missing) != 500 {
					b.Fatalf("%d missing, want 500", len(missing))
				}
			}
		})
	}
}

// BenchmarkPutLarge stores 16 MiB blobs streamed through a plain
// io.Reader, as ByteStream writes arrive. Every iteration stores a
// different blob (stores skip blobs they have); making it, and hashing it
// for its digest, is not timed.
func BenchmarkPutLarge(b *testing.B) {
	const size = 16 << 20
	for _, be := range benchBackends(b) {
		if be.name == "disk-packed" {
			continue // a 16 MiB blob is never packed: same as disk
		}
		b.Run(be.name, func(b *testing.B) {
			ba := be.new(b)
			data := blobstoretest.RandomBytes(blobstoretest.Rand(b), size)
			ctx := context.Background()
			b.SetBytes(size)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				binary.LittleEndian.PutUint64(data, uint64(i))
				d := digest.Compute(digest.SHA256, data)
				b.StartTimer()
				if err := ba.Put(ctx, d, struct{ io.Reader }{bytes.NewReader(data)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
