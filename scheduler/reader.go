package scheduler

import (
	"context"
	"time"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// maxMessageSize bounds the Actions and Commands Execute reads.
const maxMessageSize = 64 << 20

// casReader reads the small blobs that Execute needs (Actions, Commands)
// for concurrent callers together: from a remote CAS (a
// blobstore.BatchGetter), the reads waiting at one moment share one
// BatchReadBlobs, instead of one round trip each. Other stores are read
// directly.
type casReader struct {
	ctx     context.Context
	timeout time.Duration
	reqs    chan *readReq
}

type readReq struct {
	cas  blobstore.BlobAccess
	d    digest.Digest
	data []byte
	err  error
	done chan struct{}
}

const (
	// maxReadBatch bounds the blobs of one batched read.
	maxReadBatch = 1024
	// maxReadsInflight bounds the batched reads in flight.
	maxReadsInflight = 4
)

// newCASReader returns a casReader whose batches run within timeout; its
// loop stops with ctx.
func newCASReader(ctx context.Context, timeout time.Duration) *casReader {
	r := &casReader{ctx: ctx, timeout: timeout, reqs: make(chan *readReq, 4096)}
	go r.loop()
	return r
}

// get reads blob d from cas, at most maxMessageSize bytes.
func (r *casReader) get(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest) ([]byte, error) {
	if _, ok := cas.(blobstore.BatchGetter); !ok {
		return blobstore.GetBytes(ctx, cas, d, maxMessageSize)
	}
	req := &readReq{cas: cas, d: d, done: make(chan struct{})}
	select {
	case r.reqs <- req:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.ctx.Done():
		return nil, r.ctx.Err()
	}
	select {
	case <-req.done:
		return req.data, req.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (r *casReader) loop() {
	sem := make(chan struct{}, maxReadsInflight)
	for {
		var first *readReq
		select {
		case first = <-r.reqs:
		case <-r.ctx.Done():
			return
		}
		select {
		case sem <- struct{}{}:
		case <-r.ctx.Done():
			return
		}
		batch := []*readReq{first}
	collect:
		for len(batch) < maxReadBatch {
			select {
			case req := <-r.reqs:
				batch = append(batch, req)
			default:
				break collect
			}
		}
		go func() {
			defer func() { <-sem }()
			r.read(batch)
		}()
	}
}

// read serves a batch of requests, one GetBatch per store.
func (r *casReader) read(batch []*readReq) {
	ctx, cancel := context.WithTimeout(r.ctx, r.timeout)
	defer cancel()
	for len(batch) > 0 {
		cas := batch[0].cas
		var same, rest []*readReq
		for _, req := range batch {
			if req.cas == cas {
				same = append(same, req)
			} else {
				rest = append(rest, req)
			}
		}
		ds := make([]digest.Digest, len(same))
		for i, req := range same {
			ds[i] = req.d
		}
		data, errs := blobstore.GetBatch(ctx, cas, ds, maxMessageSize)
		for i, req := range same {
			req.data, req.err = data[i], errs[i]
			close(req.done)
		}
		batch = rest
	}
}
