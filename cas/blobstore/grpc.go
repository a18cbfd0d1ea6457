package blobstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
	"tvixfarm/internal/rpc"
)

// Defaults of GRPCOptions.
const (
	// DefaultGRPCTimeout bounds each unary RPC and each message of a stream.
	DefaultGRPCTimeout = time.Minute
	// DefaultGRPCRetries is how often a failed RPC is retried.
	DefaultGRPCRetries = 3
	// DefaultGRPCRetryDelay is the backoff before the first retry.
	DefaultGRPCRetryDelay = 100 * time.Millisecond
	// DefaultGRPCMaxBatchTotalSize is REAPI's usual max_batch_total_size_bytes
	// (gRPC's default message size limit), also tvixfarm's own.
	DefaultGRPCMaxBatchTotalSize = 4 << 20
	// DefaultGRPCBatchReadBelow is the size below which Get uses
	// BatchReadBlobs.
	DefaultGRPCBatchReadBelow = 1 << 20
	// DefaultGRPCChunkSize is the payload of each ByteStream WriteRequest.
	DefaultGRPCChunkSize = 1 << 20
	// DefaultGRPCMaxFindMissingDigests bounds the digests of one
	// FindMissingBlobs request.
	DefaultGRPCMaxFindMissingDigests = 10_000
)

const (
	// maxRetryDelay caps the exponential backoff between retries.
	maxRetryDelay = 5 * time.Second
	// batchRequestOverhead is what a batch request carries besides its
	// blobs (instance name aside): digest function, framing.
	batchRequestOverhead = 1 << 10
	// batchBlobOverhead is what each blob of a batch costs besides its data:
	// the digest (64 hex digits and a size), compressor, framing.
	batchBlobOverhead = 128
	// findMissingMaxBytes bounds the encoded size of a FindMissingBlobs
	// request, below gRPC's default 4 MiB receive limit.
	findMissingMaxBytes = 4<<20 - 64<<10
	// findMissingDigestBytes is an upper bound of the encoded size of one
	// digest in a FindMissingBlobs request.
	findMissingDigestBytes = 2 + 2 + 2*digest.HashSize + 1 + 10
)

// GRPCOptions configures the BlobAccess NewGRPC returns. A zero field
// selects its default.
type GRPCOptions struct {
	// Timeout bounds each attempt of a unary RPC and, for ByteStream
	// streams, each wait for a message to be sent or received (an idle
	// deadline, so that large blobs take as long as they need while a
	// stalled stream fails). Default: DefaultGRPCTimeout.
	Timeout time.Duration
	// Retries is how often an RPC failing with UNAVAILABLE or
	// RESOURCE_EXHAUSTED is retried, with exponential backoff. Default:
	// DefaultGRPCRetries; negative: never.
	Retries int
	// RetryDelay is the backoff before the first retry; it doubles with
	// each further one (with jitter), up to 5 seconds. Default:
	// DefaultGRPCRetryDelay.
	RetryDelay time.Duration
	// MaxBatchTotalSize is the server's max_batch_total_size_bytes: batch
	// requests, including the digests and framing, stay below it. Blobs
	// that do not fit a batch are written with ByteStream. Default:
	// DefaultGRPCMaxBatchTotalSize.
	MaxBatchTotalSize int64
	// BatchReadBelow is the size below which Get reads a blob with
	// BatchReadBlobs (one retriable unary RPC) rather than ByteStream.Read;
	// it is capped so that such blobs fit a batch. Default:
	// DefaultGRPCBatchReadBelow; negative: always ByteStream.
	BatchReadBelow int64
	// ChunkSize is the payload of each ByteStream WriteRequest. Default:
	// DefaultGRPCChunkSize.
	ChunkSize int
	// MaxFindMissingDigests bounds the digests of one FindMissingBlobs
	// request; FindMissing splits larger queries. Default:
	// DefaultGRPCMaxFindMissingDigests.
	MaxFindMissingDigests int
}

// withDefaults returns o with its zero fields set to the defaults.
func (o GRPCOptions) withDefaults(instance string) GRPCOptions {
	if o.Timeout <= 0 {
		o.Timeout = DefaultGRPCTimeout
	}
	if o.Retries == 0 {
		o.Retries = DefaultGRPCRetries
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryDelay <= 0 {
		o.RetryDelay = DefaultGRPCRetryDelay
	}
	if o.MaxBatchTotalSize <= 0 {
		o.MaxBatchTotalSize = DefaultGRPCMaxBatchTotalSize
	}
	if o.BatchReadBelow == 0 {
		o.BatchReadBelow = DefaultGRPCBatchReadBelow
	}
	// A blob read with BatchReadBlobs must fit a batch.
	o.BatchReadBelow = min(o.BatchReadBelow, o.MaxBatchTotalSize-batchRequestOverhead-int64(len(instance))-batchBlobOverhead+1)
	if o.ChunkSize <= 0 {
		o.ChunkSize = DefaultGRPCChunkSize
	}
	if o.MaxFindMissingDigests <= 0 {
		o.MaxFindMissingDigests = DefaultGRPCMaxFindMissingDigests
	}
	return o
}

// NewGRPC returns a content-addressable BlobAccess that stores blobs in a
// remote REAPI CAS (a tvixfarm storage role, Buildbarn, any REAPI v2
// server) reached through conn, under the given instance name. It also
// implements BatchPutter.
//
//   - FindMissing uses FindMissingBlobs, split into requests of at most
//     MaxFindMissingDigests digests, one digest function each.
//   - Get uses BatchReadBlobs for blobs smaller than BatchReadBelow, else
//     ByteStream.Read, resumed at the offset reached if the stream fails
//     with a retriable error. Data is verified against its digest: the
//     reader never yields wrong bytes followed by io.EOF, it fails with
//     DATA_LOSS instead.
//   - Put uses BatchUpdateBlobs for blobs that fit a batch, read and
//     verified first; larger blobs are streamed with ByteStream.Write and
//     verified while they are sent: finish_write goes out only once the
//     whole blob has been verified, so a wrong reader stores nothing.
//
// The empty blob is always present, as REAPI specifies: Get, Put and
// FindMissing handle it without an RPC.
//
// Every RPC has a deadline (GRPCOptions.Timeout); UNAVAILABLE and
// RESOURCE_EXHAUSTED are retried with backoff, except for a ByteStream
// upload from a reader that cannot be rewound (not an io.Seeker). Errors
// are gRPC status errors (status.Code and status.FromError see through
// the context this store adds to them).
func NewGRPC(conn grpc.ClientConnInterface, instance string, opts GRPCOptions) BlobAccess {
	return &grpcStore{
		cas:      repb.NewContentAddressableStorageClient(conn),
		bs:       bspb.NewByteStreamClient(conn),
		instance: instance,
		opts:     opts.withDefaults(instance),
	}
}

type grpcStore struct {
	cas      repb.ContentAddressableStorageClient
	bs       bspb.ByteStreamClient
	instance string
	opts     GRPCOptions
}

func isEmptyBlob(d digest.Digest) bool { return d == digest.Empty(d.Function()) }

// fitsBatch reports whether a blob of size bytes fits a batch request on
// its own.
func (s *grpcStore) fitsBatch(size int64) bool {
	return size+batchBlobOverhead <= s.batchCapacity()
}

// batchCapacity is the room for blobs (with their per-blob overhead) in one
// batch request.
func (s *grpcStore) batchCapacity() int64 {
	return s.opts.MaxBatchTotalSize - batchRequestOverhead - int64(len(s.instance))
}

// Get implements BlobAccess.
func (s *grpcStore) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if isEmptyBlob(d) {
		return newBytesReadCloser([]byte{}), nil
	}
	if d.Size() < s.opts.BatchReadBelow {
		data, err := s.batchRead(ctx, d)
		if err != nil {
			return nil, err
		}
		return newBytesReadCloser(data), nil
	}
	return s.streamRead(ctx, d)
}

// batchRead reads one blob with BatchReadBlobs and verifies it.
func (s *grpcStore) batchRead(ctx context.Context, d digest.Digest) ([]byte, error) {
	req := &repb.BatchReadBlobsRequest{
		InstanceName:   s.instance,
		Digests:        []*repb.Digest{d.Proto()},
		DigestFunction: d.Function().Proto(),
	}
	var found *repb.BatchReadBlobsResponse_Response
	err := s.retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
		defer cancel()
		resp, err := s.cas.BatchReadBlobs(ctx, req, grpc.MaxCallRecvMsgSize(int(s.opts.MaxBatchTotalSize)+1<<20))
		if err != nil {
			return err
		}
		for _, r := range resp.Responses {
			if r.GetDigest().GetHash() == d.Hex() && r.GetDigest().GetSizeBytes() == d.Size() {
				found = r
				return status.ErrorProto(r.Status)
			}
		}
		return status.Error(codes.Internal, "the server's response has no status for the blob")
	})
	if err != nil {
		return nil, withContext(err, "grpc cas: BatchReadBlobs %s", d)
	}
	if found.Compressor != repb.Compressor_IDENTITY {
		return nil, status.Errorf(codes.Internal, "grpc cas: BatchReadBlobs %s: the server sent compressor %s, which was not asked for", d, found.Compressor)
	}
	if err := d.Verify(found.Data); err != nil {
		return nil, status.Errorf(codes.DataLoss, "grpc cas: BatchReadBlobs %s: the server sent corrupt data: %s", d, status.Convert(err).Message())
	}
	return found.Data, nil
}

// streamRead opens a ByteStream read of d and waits for its first message,
// so that errors such as NotFound are returned by Get itself.
func (s *grpcStore) streamRead(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	r := &bsReader{
		s:       s,
		d:       d,
		name:    digest.ReadName(s.instance, d, repb.Compressor_IDENTITY),
		ctx:     ctx,
		retries: s.opts.Retries,
		delay:   s.opts.RetryDelay,
	}
	if err := r.fill(); err != nil && err != io.EOF {
		cancel()
		return nil, err
	} else if err == io.EOF {
		r.err = io.EOF
	}
	return &grpcReadCloser{v: digest.NewVerifyingReader(r, d), r: r, cancel: cancel}, nil
}

// grpcReadCloser is the reader Get returns for ByteStream reads: the
// verified stream, whose verification failures become DATA_LOSS.
type grpcReadCloser struct {
	v      io.Reader
	r      *bsReader
	cancel context.CancelFunc
}

func (g *grpcReadCloser) Read(p []byte) (int, error) {
	n, err := g.v.Read(p)
	return n, g.convert(err)
}

// WriteTo implements io.WriterTo: the verifying reader hashes the
// received messages while w consumes them.
func (g *grpcReadCloser) WriteTo(w io.Writer) (int64, error) {
	n, err := g.v.(io.WriterTo).WriteTo(w)
	return n, g.convert(err)
}

// Close abandons the stream.
func (g *grpcReadCloser) Close() error {
	g.cancel()
	return nil
}

// convert turns verification errors (errors that come neither from the
// stream nor from the writer of WriteTo) into DATA_LOSS: the server sent
// wrong data.
func (g *grpcReadCloser) convert(err error) error {
	if err == nil || err == io.EOF || err == g.r.err || err == g.r.werr || status.Code(err) != codes.InvalidArgument {
		return err
	}
	return status.Errorf(codes.DataLoss, "grpc cas: ByteStream.Read %s: server sent corrupt data: %s", g.r.d, status.Convert(err).Message())
}

// bsReader reads a blob with ByteStream.Read, resuming at the offset
// reached when a stream fails with a retriable error. It is a
// digest.ChunkSource: the received messages' buffers are handed over.
type bsReader struct {
	s    *grpcStore
	d    digest.Digest
	name string
	ctx  context.Context

	stream  bspb.ByteStream_ReadClient
	timer   *idleTimer
	scancel context.CancelFunc
	buf     []byte // received, not yet returned
	off     int64  // bytes received
	retries int    // retries left
	delay   time.Duration
	err     error // sticky: io.EOF or the final error
	werr    error // the error of the writer of WriteTo
}

func (r *bsReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		if err := r.fill(); err != nil {
			r.err = err
		}
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// WriteTo writes the rest of the blob to w, one received message at a
// time; w may keep reading each buffer after Write returns.
func (r *bsReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(r.buf) > 0 {
			n, err := w.Write(r.buf)
			total += int64(n)
			r.buf = r.buf[n:]
			if err != nil {
				r.werr = err
				return total, err
			}
			continue
		}
		if r.err == nil {
			if err := r.fill(); err != nil {
				r.err = err
			}
			continue
		}
		if r.err == io.EOF {
			return total, nil
		}
		return total, r.err
	}
}

// HandsOverChunks implements digest.ChunkSource: message buffers are never
// modified.
func (r *bsReader) HandsOverChunks() {}

// fill receives the next non-empty message into r.buf, opening or
// reopening the stream as needed. It returns io.EOF at the end of the blob.
func (r *bsReader) fill() error {
	for {
		if r.stream == nil {
			sctx, cancel := context.WithCancel(r.ctx)
			r.scancel = cancel
			r.timer = newIdleTimer(r.s.opts.Timeout, cancel)
			r.timer.start()
			stream, err := r.s.bs.Read(sctx, &bspb.ReadRequest{ResourceName: r.name, ReadOffset: r.off})
			r.timer.stop()
			if err != nil {
				err = r.timer.check(err)
				cancel()
				if r.backoff(err) {
					continue
				}
				return r.wrap(err)
			}
			r.stream = stream
		}
		r.timer.start()
		resp, err := r.stream.Recv()
		r.timer.stop()
		if err == nil {
			if len(resp.Data) == 0 {
				continue
			}
			if int64(len(resp.Data)) > r.d.Size()-r.off {
				r.scancel()
				r.stream = nil
				return status.Errorf(codes.DataLoss, "grpc cas: ByteStream.Read %s: the server sent more than %d bytes", r.name, r.d.Size())
			}
			r.buf = resp.Data
			r.off += int64(len(resp.Data))
			return nil
		}
		r.scancel()
		r.stream = nil
		if err == io.EOF {
			return io.EOF
		}
		err = r.timer.check(err)
		// Resume only within the blob: data beyond it fails verification.
		if r.off < r.d.Size() && r.backoff(err) {
			continue
		}
		return r.wrap(err)
	}
}

// backoff waits before a retry of err and reports whether to retry.
func (r *bsReader) backoff(err error) bool {
	if !retryable(err) || r.retries <= 0 {
		return false
	}
	r.retries--
	if !sleepCtx(r.ctx, jitter(r.delay)) {
		return false
	}
	r.delay = min(2*r.delay, maxRetryDelay)
	return true
}

func (r *bsReader) wrap(err error) error {
	if r.ctx.Err() != nil && status.Code(err) == codes.Unavailable {
		err = status.FromContextError(r.ctx.Err()).Err()
	}
	return withContext(err, "grpc cas: ByteStream.Read %s at offset %d", r.name, r.off)
}

// Put implements BlobAccess.
func (s *grpcStore) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	if isEmptyBlob(d) {
		// Nothing to store, but the reader must be empty.
		if _, err := io.Copy(io.Discard, digest.NewVerifyingReader(r, d)); err != nil {
			return withContext(err, "grpc cas: put %s", d)
		}
		return nil
	}
	if s.fitsBatch(d.Size()) {
		data, err := CAS.readAll(d, r)
		if err != nil {
			return withContext(err, "grpc cas: put %s", d)
		}
		errs := make([]error, 1)
		s.sendBatch(ctx, []Blob{{Digest: d, Data: data}}, []int{0}, errs)
		return errs[0]
	}
	return s.streamWrite(ctx, d, r)
}

// streamWrite uploads d with ByteStream.Write, retrying from the start if
// r can be rewound.
func (s *grpcStore) streamWrite(ctx context.Context, d digest.Digest, r io.Reader) error {
	chunks := newChunkBufs(int(min(int64(s.opts.ChunkSize), d.Size())))
	seeker, ok := r.(io.Seeker)
	var start int64
	if ok {
		var err error
		if start, err = seeker.Seek(0, io.SeekCurrent); err != nil {
			ok = false
		}
	}
	if !ok {
		err := s.writeOnce(ctx, d, r, chunks)
		var le *localError
		if errors.As(err, &le) {
			return le.err
		}
		return err
	}
	first := true
	err := s.retry(ctx, func(ctx context.Context) error {
		if !first {
			if _, err := seeker.Seek(start, io.SeekStart); err != nil {
				return &localError{withContext(err, "grpc cas: put %s: rewinding the reader for a retry", d)}
			}
		}
		first = false
		return s.writeOnce(ctx, d, r, chunks)
	})
	var le *localError
	if errors.As(err, &le) {
		return le.err
	}
	return err
}

// chunkBufs recycles the chunk buffers of one upload: each is sent
// without a copy (rpc.Bulk) and comes back when grpc-go has written it,
// possibly after the upload has returned.
type chunkBufs struct {
	size int
	mu   sync.Mutex
	free [][]byte
}

func newChunkBufs(size int) *chunkBufs { return &chunkBufs{size: size} }

func (c *chunkBufs) get() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.free); n > 0 {
		b := c.free[n-1]
		c.free = c.free[:n-1]
		return b
	}
	return make([]byte, c.size)
}

func (c *chunkBufs) put(b []byte) {
	c.mu.Lock()
	c.free = append(c.free, b)
	c.mu.Unlock()
}

// localError marks an error of the caller's reader (or its verification),
// which retrying the RPC does not cure.
type localError struct{ err error }

func (e *localError) Error() string { return e.err.Error() }

func (e *localError) Unwrap() error { return e.err }

// writeOnce makes one attempt at uploading d. The last chunk, with
// finish_write, is sent only once the reader has returned io.EOF and the
// data has been verified against d.
func (s *grpcStore) writeOnce(ctx context.Context, d digest.Digest, r io.Reader, chunks *chunkBufs) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	timer := newIdleTimer(s.opts.Timeout, cancel)
	defer timer.stop()
	name := digest.WriteName(s.instance, newUploadID(), d, repb.Compressor_IDENTITY)
	fail := func(what string, err error) error {
		err = timer.check(err)
		if ctx.Err() != nil && status.Code(err) == codes.Unavailable {
			err = status.FromContextError(ctx.Err()).Err()
		}
		return withContext(err, "grpc cas: ByteStream.Write %s: %s", name, what)
	}
	local := func(err error) error {
		return &localError{withContext(err, "grpc cas: put %s", d)}
	}
	vr := digest.NewVerifyingReader(r, d)
	timer.start()
	stream, err := s.bs.Write(ctx)
	timer.stop()
	if err != nil {
		return fail("opening the stream", err)
	}
	var off int64
	early := false
	for {
		buf := chunks.get()
		n := int(min(int64(len(buf)), d.Size()-off))
		if _, err := io.ReadFull(vr, buf[:n]); err != nil {
			if err == io.ErrUnexpectedEOF || err == io.EOF {
				err = status.Errorf(codes.InvalidArgument, "blob %s: reader ended after %d bytes, expected %d", d, off, d.Size())
			}
			return local(err)
		}
		last := off+int64(n) == d.Size()
		if last {
			if err := expectEOF(vr); err != nil {
				return local(err)
			}
		}
		req := &bspb.WriteRequest{WriteOffset: off, Data: buf[:n], FinishWrite: last}
		if off == 0 {
			req.ResourceName = name
		}
		timer.start()
		// Sent from buf itself, which comes back once grpc-go has written it.
		err := stream.SendMsg(rpc.Bulk{Message: req, Release: func() { chunks.put(buf) }})
		timer.stop()
		if err == io.EOF {
			// The server ended the stream: CloseAndRecv tells how.
			early = !last
			break
		} else if err != nil {
			return fail("sending", err)
		}
		off += int64(n)
		if last {
			break
		}
	}
	timer.start()
	resp, err := stream.CloseAndRecv()
	timer.stop()
	if err != nil {
		return fail("closing", err)
	}
	if resp.CommittedSize != d.Size() {
		return status.Errorf(codes.Internal, "grpc cas: ByteStream.Write %s: server committed %d bytes of %d", name, resp.CommittedSize, d.Size())
	}
	if early {
		// The server has the blob already (another upload stored it).
		// Still check the caller's data, so that a wrong reader fails
		// every Put alike.
		if _, err := io.Copy(io.Discard, vr); err != nil {
			return local(err)
		}
	}
	return nil
}

// expectEOF reads from a verifying reader that has delivered its whole
// blob: io.EOF confirms the data, anything else is an error.
func expectEOF(r io.Reader) error {
	var one [1]byte
	for range 100 {
		n, err := r.Read(one[:])
		switch {
		case err == io.EOF && n == 0:
			return nil
		case err != nil && err != io.EOF:
			return err
		case n > 0:
			return errors.New("reader yields more data than the blob's size")
		}
	}
	return io.ErrNoProgress
}

// newUploadID returns a random (version 4) UUID for a ByteStream upload.
func newUploadID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// PutBatch implements BatchPutter: the blobs are verified locally, then
// sent with BatchUpdateBlobs in batches that fit MaxBatchTotalSize; blobs
// too large for a batch go through Put. Each blob's error is the status
// the server returned for it.
func (s *grpcStore) PutBatch(ctx context.Context, blobs []Blob) []error {
	errs := make([]error, len(blobs))
	ParallelFor(len(blobs), func(i int) {
		b := blobs[i]
		if !s.fitsBatch(b.Digest.Size()) {
			return // verified by Put, while it sends
		}
		if int64(len(b.Data)) != b.Digest.Size() {
			errs[i] = digest.MismatchError(b.Digest, digest.Compute(b.Digest.Function(), b.Data))
		} else {
			errs[i] = b.Digest.Verify(b.Data)
		}
		if errs[i] != nil {
			errs[i] = withContext(errs[i], "grpc cas: put %s", b.Digest)
		}
	})
	// Send each digest once; its duplicates share its result.
	first := make(map[digest.Digest]int, len(blobs))
	dupOf := map[int]int{}
	var large []int
	// Batches are filled per digest function (a request has one).
	type batch struct {
		idx  []int
		size int64
	}
	var batches []*batch
	open := map[digest.Function]*batch{}
	capacity := s.batchCapacity()
	for i, b := range blobs {
		if errs[i] != nil || isEmptyBlob(b.Digest) {
			continue // verified above: nothing to send
		}
		if j, ok := first[b.Digest]; ok {
			dupOf[i] = j
			continue
		}
		first[b.Digest] = i
		size := b.Digest.Size() + batchBlobOverhead
		if !s.fitsBatch(b.Digest.Size()) {
			large = append(large, i)
			continue
		}
		bt := open[b.Digest.Function()]
		if bt == nil || bt.size+size > capacity {
			bt = &batch{}
			batches = append(batches, bt)
			open[b.Digest.Function()] = bt
		}
		bt.idx = append(bt.idx, i)
		bt.size += size
	}
	ParallelFor(len(batches)+len(large), func(k int) {
		if k < len(batches) {
			s.sendBatch(ctx, blobs, batches[k].idx, errs)
			return
		}
		i := large[k-len(batches)]
		errs[i] = s.Put(ctx, blobs[i].Digest, bytes.NewReader(blobs[i].Data))
	})
	for i, j := range dupOf {
		errs[i] = errs[j]
	}
	return errs
}

// errRetryBlobs makes retry repeat a batch for its blobs whose status was
// retriable.
var errRetryBlobs = status.Error(codes.Unavailable, "some blobs of the batch failed with a retriable status")

// sendBatch stores blobs[idx] (verified, distinct, of one digest function,
// fitting one batch) with BatchUpdateBlobs, retrying the RPC and the blobs
// that failed with a retriable status, and sets errs[idx].
func (s *grpcStore) sendBatch(ctx context.Context, blobs []Blob, idx []int, errs []error) {
	fn := blobs[idx[0]].Digest.Function()
	pending := idx
	err := s.retry(ctx, func(ctx context.Context) error {
		req := &repb.BatchUpdateBlobsRequest{
			InstanceName:   s.instance,
			DigestFunction: fn.Proto(),
			Requests:       make([]*repb.BatchUpdateBlobsRequest_Request, len(pending)),
		}
		for k, i := range pending {
			req.Requests[k] = &repb.BatchUpdateBlobsRequest_Request{Digest: blobs[i].Digest.Proto(), Data: blobs[i].Data}
		}
		ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
		defer cancel()
		resp, err := s.cas.BatchUpdateBlobs(ctx, req)
		if err != nil {
			return err
		}
		statuses := make(map[digest.Digest]error, len(resp.Responses))
		for _, r := range resp.Responses {
			if d, err := digest.FromProto(fn, r.Digest); err == nil {
				statuses[d] = status.ErrorProto(r.Status)
			}
		}
		var again []int
		for _, i := range pending {
			d := blobs[i].Digest
			err, ok := statuses[d]
			if !ok {
				err = status.Error(codes.Internal, "the server's response has no status for the blob")
			}
			if err != nil {
				err = withContext(err, "grpc cas: BatchUpdateBlobs %s", d)
				if retryable(err) {
					again = append(again, i)
				}
			}
			errs[i] = err
		}
		pending = again
		if len(again) > 0 {
			return errRetryBlobs
		}
		return nil
	})
	if err != nil && err != errRetryBlobs {
		err = withContext(err, "grpc cas: BatchUpdateBlobs of %d blobs", len(pending))
		for _, i := range pending {
			errs[i] = err
		}
	}
}

// FindMissing implements BlobAccess: the distinct digests are asked about
// in requests of one digest function and at most MaxFindMissingDigests
// digests, concurrently; the result follows the order of ds.
func (s *grpcStore) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	if len(ds) == 0 {
		return nil, nil
	}
	seen := make(map[digest.Digest]bool, len(ds))
	byFn := map[digest.Function][]digest.Digest{}
	var fns []digest.Function
	for _, d := range ds {
		if seen[d] || isEmptyBlob(d) {
			continue
		}
		seen[d] = true
		if byFn[d.Function()] == nil {
			fns = append(fns, d.Function())
		}
		byFn[d.Function()] = append(byFn[d.Function()], d)
	}
	perRequest := min(s.opts.MaxFindMissingDigests, (findMissingMaxBytes-len(s.instance))/findMissingDigestBytes)
	var chunks [][]digest.Digest
	for _, fn := range fns {
		all := byFn[fn]
		for len(all) > 0 {
			n := min(len(all), perRequest)
			chunks = append(chunks, all[:n])
			all = all[n:]
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	missing := map[digest.Digest]bool{}
	var firstErr error
	ParallelFor(len(chunks), func(k int) {
		got, err := s.findMissing(ctx, chunks[k])
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			// The first error: those after it may be its cancellations.
			if firstErr == nil {
				firstErr = err
				cancel()
			}
			return
		}
		for _, d := range got {
			missing[d] = true
		}
	})
	if firstErr != nil {
		return nil, firstErr
	}
	var out []digest.Digest
	for _, d := range ds {
		if missing[d] {
			out = append(out, d)
		}
	}
	return out, nil
}

// findMissing makes one FindMissingBlobs request for ds, distinct digests
// of one function.
func (s *grpcStore) findMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	fn := ds[0].Function()
	req := &repb.FindMissingBlobsRequest{
		InstanceName:   s.instance,
		BlobDigests:    make([]*repb.Digest, len(ds)),
		DigestFunction: fn.Proto(),
	}
	asked := make(map[digest.Digest]bool, len(ds))
	for i, d := range ds {
		req.BlobDigests[i] = d.Proto()
		asked[d] = true
	}
	var resp *repb.FindMissingBlobsResponse
	err := s.retry(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
		defer cancel()
		var err error
		resp, err = s.cas.FindMissingBlobs(ctx, req)
		return err
	})
	if err != nil {
		return nil, withContext(err, "grpc cas: FindMissingBlobs of %d %s digests", len(ds), fn)
	}
	out := make([]digest.Digest, 0, len(resp.MissingBlobDigests))
	for _, pd := range resp.MissingBlobDigests {
		d, err := digest.FromProto(fn, pd)
		if err != nil || !asked[d] {
			return nil, status.Errorf(codes.Internal, "grpc cas: FindMissingBlobs: the server reports %s/%d missing, which was not asked about", pd.GetHash(), pd.GetSizeBytes())
		}
		out = append(out, d)
	}
	return out, nil
}

// withContext prefixes err's message with context. A status error stays
// one status error (with its code and details, not "rpc error: ..." in the
// message); other errors, such as a reader's, are wrapped, so errors.Is
// finds them and status.Code sees through to any status they wrap.
func withContext(err error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if se, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		p := se.GRPCStatus().Proto()
		p.Message = msg + ": " + p.Message
		return status.FromProto(p).Err()
	}
	return fmt.Errorf("%s: %w", msg, err)
}

// retryable reports whether an RPC error may go away on a retry. Errors of
// the caller's reader never do.
func retryable(err error) bool {
	var le *localError
	if errors.As(err, &le) {
		return false
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		return true
	}
	return false
}

// retry calls attempt until it succeeds, fails with an error that is not
// retryable, or Retries retries have failed, with exponential backoff in
// between. A context that ends during the backoff ends the retries.
func (s *grpcStore) retry(ctx context.Context, attempt func(ctx context.Context) error) error {
	delay := s.opts.RetryDelay
	for i := 0; ; i++ {
		err := attempt(ctx)
		if err == nil || !retryable(err) || i >= s.opts.Retries {
			if err != nil && ctx.Err() != nil && status.Code(err) == codes.Unavailable {
				// The connection was torn down because ctx ended.
				err = status.FromContextError(ctx.Err()).Err()
			}
			return err
		}
		if !sleepCtx(ctx, jitter(delay)) {
			return status.FromContextError(ctx.Err()).Err()
		}
		delay = min(2*delay, maxRetryDelay)
	}
}

// jitter returns a random duration between d/2 and d.
func jitter(d time.Duration) time.Duration {
	return d/2 + mrand.N(d/2+1)
}

// sleepCtx sleeps for d and reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// idleTimer cancels a stream that makes no progress: it runs while the
// client waits to send or receive a message.
type idleTimer struct {
	t       *time.Timer
	d       time.Duration
	expired atomic.Bool
}

func newIdleTimer(d time.Duration, cancel context.CancelFunc) *idleTimer {
	it := &idleTimer{d: d}
	it.t = time.AfterFunc(d, func() {
		it.expired.Store(true)
		cancel()
	})
	it.t.Stop()
	return it
}

func (it *idleTimer) start() { it.t.Reset(it.d) }

func (it *idleTimer) stop() { it.t.Stop() }

// check turns the cancellation the timer caused into DEADLINE_EXCEEDED.
func (it *idleTimer) check(err error) error {
	if err != nil && it.expired.Load() {
		return status.Errorf(codes.DeadlineExceeded, "no progress for %v: %v", it.d, status.Convert(err).Message())
	}
	return err
}
