package castore_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	bspb "google.golang.org/genproto/googleapis/bytestream"

	"tvixfarm/cas/digest"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// The castore BlobService against the REAPI path (ByteStream for a large
// blob, BatchUpdateBlobs/BatchReadBlobs for small ones) on the same
// server and disk store, over loopback:
//
//	go test -run '^$' -bench . -benchtime 5x ./cas/castore/
//
// Figures: docs/BENCHMARKS.md.

const (
	largeSize  = 100 << 20
	smallSize  = 1 << 10
	smallCount = 10_000
	chunkSize  = 1 << 20 // what a Go client sends per message
	parallel   = 16      // concurrent castore streams for small blobs
)

// unique returns n bytes whose first 8 are i: a new blob per iteration.
func unique(base []byte, i int) []byte {
	b := append([]byte(nil), base...)
	binary.LittleEndian.PutUint64(b, uint64(i))
	return b
}

func castorePut(ctx context.Context, c castorepb.BlobServiceClient, data []byte) error {
	s, err := c.Put(ctx)
	if err != nil {
		return err
	}
	for off := 0; off < len(data); off += chunkSize {
		if err := s.Send(&castorepb.BlobChunk{Data: data[off:min(off+chunkSize, len(data))]}); err != nil {
			return err
		}
	}
	_, err = s.CloseAndRecv()
	return err
}

func castoreRead(ctx context.Context, c castorepb.BlobServiceClient, h []byte) (int, error) {
	s, err := c.Read(ctx, &castorepb.ReadBlobRequest{Digest: h})
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n += len(m.Data)
	}
}

var uploads atomic.Int64

func bsPut(ctx context.Context, c bspb.ByteStreamClient, data []byte) error {
	i := uploads.Add(1)
	d := digest.Compute(digest.BLAKE3, data)
	w, err := c.Write(ctx)
	if err != nil {
		return err
	}
	name := digest.WriteName("", fmt.Sprintf("00000000-0000-4000-8000-%012d", i), d, repb.Compressor_IDENTITY)
	for off := 0; off < len(data); off += chunkSize {
		end := min(off+chunkSize, len(data))
		req := &bspb.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := w.Send(req); err != nil {
			break // CloseAndRecv has the server's error
		}
	}
	_, err = w.CloseAndRecv()
	return err
}

func bsRead(ctx context.Context, c bspb.ByteStreamClient, d digest.Digest) (int, error) {
	s, err := c.Read(ctx, &bspb.ReadRequest{ResourceName: digest.ReadName("", d, repb.Compressor_IDENTITY)})
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n += len(m.Data)
	}
}

func BenchmarkLargeBlob(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	cs := castorepb.NewBlobServiceClient(e.conn)
	bs := bspb.NewByteStreamClient(e.conn)
	base := make([]byte, largeSize)
	rand.Read(base)
	b.Run("Put/castore", func(b *testing.B) {
		b.SetBytes(largeSize)
		for i := 0; i < b.N; i++ {
			if err := castorePut(ctx, cs, unique(base, i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Put/bytestream", func(b *testing.B) {
		b.SetBytes(largeSize)
		for i := 0; i < b.N; i++ {
			if err := bsPut(ctx, bs, unique(base, 1_000_000+i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	d := digest.Compute(digest.BLAKE3, base)
	if err := bsPut(ctx, bs, base); err != nil {
		b.Fatal(err)
	}
	h := d.Hash()
	b.Run("Read/castore", func(b *testing.B) {
		b.SetBytes(largeSize)
		for i := 0; i < b.N; i++ {
			if n, err := castoreRead(ctx, cs, h[:]); err != nil || n != largeSize {
				b.Fatal(n, err)
			}
		}
	})
	b.Run("Read/bytestream", func(b *testing.B) {
		b.SetBytes(largeSize)
		for i := 0; i < b.N; i++ {
			if n, err := bsRead(ctx, bs, d); err != nil || n != largeSize {
				b.Fatal(n, err)
			}
		}
	})
}

func BenchmarkSmallBlobs(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	cs := castorepb.NewBlobServiceClient(e.conn)
	cas := repb.NewContentAddressableStorageClient(e.conn)
	base := make([]byte, smallSize)
	rand.Read(base)
	var seq int
	var mu sync.Mutex
	next := func() []byte {
		mu.Lock()
		defer mu.Unlock()
		seq++
		return unique(base, seq)
	}
	const batch = 2000 // 2 MB per BatchUpdateBlobs, under the 4 MiB limit
	b.Run("Put/castore", func(b *testing.B) {
		b.SetBytes(smallCount * smallSize)
		for i := 0; i < b.N; i++ {
			var g errgroup.Group
			g.SetLimit(parallel)
			for j := 0; j < smallCount; j++ {
				data := next()
				g.Go(func() error { return castorePut(ctx, cs, data) })
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Put/batch", func(b *testing.B) {
		b.SetBytes(smallCount * smallSize)
		for i := 0; i < b.N; i++ {
			var g errgroup.Group
			g.SetLimit(parallel)
			for j := 0; j < smallCount; j += batch {
				req := &repb.BatchUpdateBlobsRequest{DigestFunction: repb.DigestFunction_BLAKE3}
				for k := 0; k < batch; k++ {
					data := next()
					req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: digest.Compute(digest.BLAKE3, data).Proto(), Data: data})
				}
				g.Go(func() error { _, err := cas.BatchUpdateBlobs(ctx, req); return err })
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
		}
	})
	// One set of blobs to read.
	var ds []digest.Digest
	req := &repb.BatchUpdateBlobsRequest{DigestFunction: repb.DigestFunction_BLAKE3}
	for j := 0; j < smallCount; j++ {
		data := next()
		d := digest.Compute(digest.BLAKE3, data)
		ds = append(ds, d)
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: data})
		if len(req.Requests) == batch {
			if _, err := cas.BatchUpdateBlobs(ctx, req); err != nil {
				b.Fatal(err)
			}
			req = &repb.BatchUpdateBlobsRequest{DigestFunction: repb.DigestFunction_BLAKE3}
		}
	}
	b.Run("Read/castore", func(b *testing.B) {
		b.SetBytes(smallCount * smallSize)
		for i := 0; i < b.N; i++ {
			var g errgroup.Group
			g.SetLimit(parallel)
			for _, d := range ds {
				h := d.Hash()
				g.Go(func() error {
					n, err := castoreRead(ctx, cs, h[:])
					if err == nil && n != smallSize {
						err = fmt.Errorf("read %d bytes", n)
					}
					return err
				})
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Read/batch", func(b *testing.B) {
		b.SetBytes(smallCount * smallSize)
		for i := 0; i < b.N; i++ {
			var g errgroup.Group
			g.SetLimit(parallel)
			for j := 0; j < len(ds); j += batch {
				req := &repb.BatchReadBlobsRequest{DigestFunction: repb.DigestFunction_BLAKE3}
				for _, d := range ds[j:min(j+batch, len(ds))] {
					req.Digests = append(req.Digests, d.Proto())
				}
				g.Go(func() error { _, err := cas.BatchReadBlobs(ctx, req); return err })
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
