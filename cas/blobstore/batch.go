package blobstore

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"

	"tvixfarm/cas/digest"
)

// Blob is a blob held in memory, as batch uploads carry them.
type Blob struct {
	Digest digest.Digest
	Data   []byte
}

// BatchPutter is implemented by stores that store many small blobs at
// once more cheaply than one by one (the disk store appends them to a
// pack file in one write).
type BatchPutter interface {
	// PutBatch stores blobs, each verified as by Put, and returns one
	// error (or nil) per blob.
	PutBatch(ctx context.Context, blobs []Blob) []error
}

// PutBatch stores blobs in ba, with ba's PutBatch if it has one, else with
// concurrent Puts. It returns one error (or nil) per blob.
func PutBatch(ctx context.Context, ba BlobAccess, blobs []Blob) []error {
	if bp, ok := ba.(BatchPutter); ok {
		return bp.PutBatch(ctx, blobs)
	}
	errs := make([]error, len(blobs))
	ParallelFor(len(blobs), func(i int) {
		errs[i] = ba.Put(ctx, blobs[i].Digest, bytes.NewReader(blobs[i].Data))
	})
	return errs
}

// Parallelism bounds the concurrent operations of one batch. Most are a
// few microseconds (pack files, memory), some wait for the disk or the
// network (files, Redis): a few workers cover both.
const Parallelism = 8

// ParallelFor calls f(0) ... f(n-1) on up to Parallelism goroutines. A
// fixed set of workers, rather than a goroutine per item, keeps the cost of
// starting goroutines and growing their stacks out of batches of thousands
// of small blobs.
func ParallelFor(n int, f func(i int)) {
	workers := min(n, Parallelism)
	if workers <= 1 {
		for i := 0; i < n; i++ {
			f(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	wg.Add(workers)
	for w := 0; w < workers; w++ {
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				f(i)
			}
		}()
	}
	wg.Wait()
}

// PutBatch implements BatchPutter: small blobs are verified, then appended
// to the current pack together; the others are stored one by one.
func (s *disk) PutBatch(ctx context.Context, blobs []Blob) []error {
	errs := make([]error, len(blobs))
	if s.kind != CAS || s.opts.PackBelow == 0 {
		ParallelFor(len(blobs), func(i int) {
			errs[i] = s.Put(ctx, blobs[i].Digest, bytes.NewReader(blobs[i].Data))
		})
		return errs
	}
	var small []int
	var large []int
	for i, b := range blobs {
		switch {
		case b.Digest.Size() >= s.opts.PackBelow:
			large = append(large, i)
		default:
			small = append(small, i)
		}
	}
	ParallelFor(len(large), func(j int) {
		b := blobs[large[j]]
		errs[large[j]] = s.Put(ctx, b.Digest, bytes.NewReader(b.Data))
	})
	// Verify and drop what is stored already, in parallel (hashing is
	// the CPU cost), then append the rest at once.
	recs := make([]*pendingRecord, len(small))
	ParallelFor(len(small), func(j int) {
		b := blobs[small[j]]
		if _, ok := s.lookup(b.Digest); ok {
			return
		}
		if int64(len(b.Data)) != b.Digest.Size() {
			errs[small[j]] = digest.MismatchError(b.Digest, digest.Compute(b.Digest.Function(), b.Data))
			return
		}
		if err := b.Digest.Verify(b.Data); err != nil {
			errs[small[j]] = err
			return
		}
		recs[j] = &pendingRecord{d: b.Digest, rec: encodeRecord(b.Digest, b.Data), done: make(chan struct{})}
	})
	var pending []*pendingRecord
	var where []int
	for j, pr := range recs {
		if pr != nil {
			pending = append(pending, pr)
			where = append(where, small[j])
		}
	}
	if len(pending) == 0 {
		return errs
	}
	s.appendRecords(pending)
	for k, pr := range pending {
		errs[where[k]] = s.indexRecord(pr)
	}
	return errs
}
