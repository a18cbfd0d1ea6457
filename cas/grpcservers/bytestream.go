package grpcservers

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/internal/rpc"
)

// readChunkSize is the payload of each ReadResponse: large enough to keep
// per-message costs low, well under clients' default 4 MiB receive limit.
const readChunkSize = 1 << 20

// DefaultUploadIdleTimeout is how long an interrupted upload is kept so the
// client can resume it (QueryWriteStatus, then Write at the committed
// offset).
const DefaultUploadIdleTimeout = time.Minute

// ByteStreamServer implements ByteStream over the CAS: Read with offset and
// limit, resumable Write, QueryWriteStatus, for blobs and zstd
// compressed-blobs.
type ByteStreamServer struct {
	bspb.UnimplementedByteStreamServer
	stores *blobstore.Instances
	// ctx outlives single streams: resumable uploads run under it and are
	// aborted when it ends (server shutdown).
	ctx         context.Context
	idleTimeout time.Duration

	mu      sync.Mutex
	uploads map[string]*upload
}

// NewByteStreamServer returns a ByteStream server over stores. Uploads in
// progress are abandoned, and nothing of them stored, when ctx ends.
func NewByteStreamServer(ctx context.Context, stores *blobstore.Instances, idleTimeout time.Duration) *ByteStreamServer {
	if idleTimeout <= 0 {
		idleTimeout = DefaultUploadIdleTimeout
	}
	s := &ByteStreamServer{stores: stores, ctx: ctx, idleTimeout: idleTimeout, uploads: make(map[string]*upload)}
	context.AfterFunc(ctx, s.abortIdle)
	return s
}

// abortIdle abandons the uploads that wait for a resume, at shutdown.
func (s *ByteStreamServer) abortIdle() {
	s.mu.Lock()
	var idle []*upload
	for _, u := range s.uploads {
		idle = append(idle, u)
	}
	s.mu.Unlock()
	for _, u := range idle {
		s.expire(u)
	}
}

// Read streams a blob from read_offset for at most read_limit bytes, or
// the zstd compression of the blob from read_offset (which counts
// uncompressed bytes, as REAPI specifies; compressed reads take no limit).
func (s *ByteStreamServer) Read(req *bspb.ReadRequest, stream bspb.ByteStream_ReadServer) error {
	rn, err := digest.ParseReadResourceName(req.ResourceName)
	if err != nil {
		return err
	}
	if req.ReadOffset < 0 {
		return status.Errorf(codes.OutOfRange, "negative read_offset %d", req.ReadOffset)
	}
	if req.ReadLimit < 0 {
		return status.Errorf(codes.InvalidArgument, "negative read_limit %d", req.ReadLimit)
	}
	d := rn.Digest
	// For compressed-blobs, REAPI has read_offset count uncompressed bytes
	// and forbids a read_limit.
	if rn.Compressor != repb.Compressor_IDENTITY && req.ReadLimit != 0 {
		return status.Errorf(codes.InvalidArgument, "read_limit %d: compressed reads cannot be limited", req.ReadLimit)
	}
	if req.ReadOffset > d.Size() {
		return status.Errorf(codes.OutOfRange, "read_offset %d is beyond the end of blob %s", req.ReadOffset, d)
	}
	var rc io.ReadCloser
	if d.Size() == 0 {
		if d != digest.Empty(d.Function()) {
			return blobstore.NotFound(blobstore.CAS, d)
		}
		rc = io.NopCloser(eofReader{})
	} else {
		rc, err = s.stores.For(rn.Instance).CAS.Get(stream.Context(), d)
		if err != nil {
			return err
		}
	}
	defer rc.Close()
	var r io.Reader = rc
	if req.ReadOffset > 0 {
		if sk, ok := r.(io.Seeker); ok {
			_, err = sk.Seek(req.ReadOffset, io.SeekStart)
		} else {
			_, err = io.CopyN(io.Discard, r, req.ReadOffset)
		}
		if err != nil {
			return readError(d, err)
		}
	}
	if rn.Compressor == repb.Compressor_ZSTD {
		src := r
		pr, pw := io.Pipe()
		defer pr.Close()
		go func() {
			zw, err := zstd.NewWriter(pw, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
			if err == nil {
				_, err = io.Copy(zw, src)
				if cerr := zw.Close(); err == nil {
					err = cerr
				}
			}
			pw.CloseWithError(err)
		}()
		r = pr
	}
	if req.ReadLimit > 0 {
		r = io.LimitReader(r, req.ReadLimit)
	}
	if cr, ok := r.(blobstore.ChunkedReader); ok {
		// The store's buffers go out as messages, sent from the buffers
		// themselves (sendWriter.WriteOwned).
		_, err := cr.WriteTo(sendWriter{stream})
		if err != nil {
			return readError(d, err)
		}
		return nil
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if serr := stream.Send(&bspb.ReadResponse{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		} else if err != nil {
			return readError(d, err)
		}
	}
}

// sendWriter sends each Write as one ReadResponse.
type sendWriter struct{ stream bspb.ByteStream_ReadServer }

func (w sendWriter) Write(p []byte) (int, error) {
	if err := w.stream.Send(&bspb.ReadResponse{Data: p}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteOwned sends p as one ReadResponse without copying it; grpc-go
// calls release once it has written p to the connection.
func (w sendWriter) WriteOwned(p []byte, release func()) (int, error) {
	if err := w.stream.SendMsg(rpc.Bulk{Message: &bspb.ReadResponse{Data: p}, Release: release}); err != nil {
		return 0, err
	}
	return len(p), nil
}

func readError(d digest.Digest, err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Errorf(codes.Internal, "read blob %s: %v", d, err)
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// upload is a Write in progress. Its bytes flow through a pipe into a
// BlobAccess.Put that runs under the server's context, so a client whose
// stream breaks can resume where it stopped, on a new stream, until the
// upload has been idle for the idle timeout.
//
// For compressed-blobs, each stream's zstd data is decoded on its own (a
// resuming client starts a new zstd frame at the uncompressed offset it
// resumes from, as REAPI specifies), and committed counts uncompressed
// bytes.
type upload struct {
	name       string
	d          digest.Digest
	compressed bool
	pw         *chunkPipe    // uncompressed bytes into Put
	done       chan struct{} // closed when Put has returned
	err        error         // Put's result, valid once done is closed

	mu        sync.Mutex   // held by the stream feeding the upload
	committed atomic.Int64 // uncompressed bytes handed to Put
	idle      *time.Timer
}

// streamDecoder decodes one stream's compressed data into an upload.
type streamDecoder struct {
	zw   *io.PipeWriter
	done chan struct{}
	err  error // valid once done is closed
}

func (u *upload) startDecoder() *streamDecoder {
	pr, pw := io.Pipe()
	sd := &streamDecoder{zw: pw, done: make(chan struct{})}
	go func() {
		defer close(sd.done)
		zr, err := zstd.NewReader(pr, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
		if err != nil {
			sd.err = status.Errorf(codes.Internal, "zstd: %v", err)
			pr.CloseWithError(sd.err)
			return
		}
		defer zr.Close()
		_, err = io.Copy(copyingWriter{u}, &zstdErrReader{zr})
		sd.err = err
		pr.CloseWithError(errPutReturned)
	}()
	return sd
}

// finish ends the stream's compressed data and waits for the decoder.
func (sd *streamDecoder) finish(err error) error {
	sd.zw.CloseWithError(err)
	<-sd.done
	return sd.err
}

// copyingWriter hands decoded data to the upload; the decoder reuses its
// buffers, so the pipe must copy them.
type copyingWriter struct{ u *upload }

func (w copyingWriter) Write(p []byte) (int, error) {
	n, err := w.u.pw.WriteCopy(p)
	w.u.committed.Add(int64(n))
	return n, err
}

// Write receives a blob. The first message names the resource; every
// message's write_offset must equal the bytes committed so far; the last
// sets finish_write. Data is verified against the digest before it is
// stored. If the blob is already stored, the write ends at once.
func (s *ByteStreamServer) Write(stream bspb.ByteStream_WriteServer) error {
	req, err := stream.Recv()
	if err != nil {
		return err
	}
	rn, err := digest.ParseWriteResourceName(req.ResourceName)
	if err != nil {
		return err
	}
	d := rn.Digest
	compressed := rn.Compressor != repb.Compressor_IDENTITY
	cas := s.stores.For(rn.Instance).CAS
	name := req.ResourceName
	u, err := s.attach(stream.Context(), cas, name, d, compressed, req.WriteOffset)
	if err != nil {
		return err
	}
	if u == nil {
		// Already stored.
		size := d.Size()
		if compressed {
			size = -1
		}
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: size})
	}
	defer u.mu.Unlock()
	// Offsets within a stream: its first write_offset, then plus the bytes
	// received (compressed bytes, for compressed-blobs).
	next := req.WriteOffset
	var dec *streamDecoder
	if compressed {
		dec = u.startDecoder()
	}
	// stop ends this stream's part of the upload: for a resume, or for good.
	stop := func(err error) error {
		if dec != nil {
			if derr := dec.finish(io.ErrUnexpectedEOF); err == nil && status.Code(derr) == codes.InvalidArgument {
				err = derr
			}
		}
		s.detach(u)
		return err
	}
	for {
		if req.WriteOffset != next {
			return stop(status.Errorf(codes.InvalidArgument, "write_offset %d, but %d bytes are committed", req.WriteOffset, next))
		}
		// Compare with the stream's name, not u.name: an upload running
		// independently of a concurrent one of the same name has no name.
		if req.ResourceName != "" && req.ResourceName != name {
			return stop(status.Errorf(codes.InvalidArgument, "resource name changed within one write"))
		}
		if len(req.Data) > 0 {
			var err error
			if dec != nil {
				_, err = dec.zw.Write(req.Data)
			} else {
				data := req.Data // ours: the pipe gives it back when stored
				_, err = u.pw.WriteOwned(data, func() { rpc.ReleaseBuffer(data) })
				if err == nil {
					u.committed.Add(int64(len(req.Data)))
				}
			}
			if err != nil {
				if dec != nil {
					if derr := dec.finish(err); status.Code(derr) == codes.InvalidArgument {
						// Corrupt compressed data: the upload is void.
						u.pw.CloseWithError(derr)
						<-u.done
						s.finish(u)
						return derr
					}
				}
				// Put has returned (for example, on too much data): say why.
				<-u.done
				s.finish(u)
				if u.err == nil {
					// It finished without needing more data: another
					// writer stored the blob meanwhile.
					size := d.Size()
					if compressed {
						size = -1
					}
					return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: size})
				}
				return u.err
			}
			next += int64(len(req.Data))
		}
		if req.FinishWrite {
			if dec != nil {
				if err := dec.finish(nil); err != nil && err != errPutReturned {
					u.pw.CloseWithError(err)
					<-u.done
					s.finish(u)
					if status.Code(err) == codes.InvalidArgument {
						return err
					}
					if u.err != nil {
						return u.err
					}
					return err
				}
			}
			u.pw.Close()
			<-u.done
			s.finish(u)
			if u.err != nil {
				return u.err
			}
			return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: next})
		}
		req, err = stream.Recv()
		if err != nil {
			// The client went away: keep the upload for a resume.
			if err == io.EOF {
				return stop(status.Errorf(codes.InvalidArgument, "write of %s ended without finish_write", d))
			}
			return stop(err)
		}
	}
}

// attach returns the upload for name, locked for the caller, creating it
// if needed; it returns nil if the blob is already stored.
func (s *ByteStreamServer) attach(ctx context.Context, cas blobstore.BlobAccess, name string, d digest.Digest, compressed bool, offset int64) (*upload, error) {
	s.mu.Lock()
	u := s.uploads[name]
	locked := u != nil && u.mu.TryLock()
	if u != nil && !locked && offset != 0 {
		// A resume races with the end of the broken stream that fed the
		// upload (the client may see its committed size in
		// QueryWriteStatus first): wait for that stream to let go.
		s.mu.Unlock()
		locked = lockWait(ctx, &u.mu, resumeWait)
		s.mu.Lock()
		if locked && s.uploads[name] != u {
			// Finished or expired meanwhile.
			u.mu.Unlock()
			u, locked = nil, false
		}
	}
	if locked {
		s.mu.Unlock()
		u.idle.Stop()
		if offset == u.committed.Load() {
			return u, nil
		}
		if offset != 0 {
			s.detach(u)
			u.mu.Unlock()
			return nil, status.Errorf(codes.InvalidArgument, "write_offset %d, but %d bytes of %s are committed", offset, u.committed.Load(), name)
		}
		// A restart from the beginning replaces the old upload.
		u.pw.CloseWithError(errors.New("upload restarted"))
		s.finish(u)
		u.mu.Unlock()
		s.mu.Lock()
	} else if u != nil {
		// Another stream feeds this upload: upload independently.
		name = ""
	}
	s.mu.Unlock()
	if d.Size() == 0 {
		if d != digest.Empty(d.Function()) {
			return nil, digest.MismatchError(d, digest.Empty(d.Function()))
		}
	}
	missing, err := cas.FindMissing(ctx, []digest.Digest{d})
	if err != nil {
		return nil, err
	}
	// A stored blob ends the write at once, whatever offset a (resuming)
	// client starts at.
	if len(missing) == 0 && d.Size() > 0 || d.Size() == 0 && !compressed {
		return nil, nil
	}
	if offset != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "write_offset %d for an upload that has not started (or has expired); query the write status and restart from 0", offset)
	}
	pw := newChunkPipe()
	u = &upload{name: name, d: d, compressed: compressed, pw: pw, done: make(chan struct{})}
	u.mu.Lock()
	u.idle = time.AfterFunc(s.idleTimeout, func() { s.expire(u) })
	u.idle.Stop()
	go func() {
		defer close(u.done)
		defer pw.CloseRead()
		var r io.Reader = pw
		if d.Size() == 0 {
			// The empty blob is implicit; just validate the stream.
			_, u.err = io.Copy(io.Discard, digest.NewVerifyingReader(r, d))
		} else {
			u.err = cas.Put(s.ctx, d, r)
		}
	}()
	if name != "" {
		s.mu.Lock()
		s.uploads[name] = u
		s.mu.Unlock()
	}
	return u, nil
}

var errPutReturned = errors.New("upload no longer accepts data")

// resumeWait bounds how long a resuming Write waits for the stream that
// fed the upload before to let go of it.
const resumeWait = 5 * time.Second

// lockWait locks mu, waiting at most max and while ctx lasts; it reports
// whether it locked mu.
func lockWait(ctx context.Context, mu *sync.Mutex, max time.Duration) bool {
	deadline := time.Now().Add(max)
	for !mu.TryLock() {
		if ctx.Err() != nil || time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// zstdErrReader reports corrupt compressed data as InvalidArgument.
type zstdErrReader struct{ zr *zstd.Decoder }

func (z *zstdErrReader) Read(p []byte) (int, error) {
	n, err := z.zr.Read(p)
	if err != nil && err != io.EOF {
		if _, ok := status.FromError(err); !ok || status.Code(err) == codes.Unknown {
			err = status.Errorf(codes.InvalidArgument, "invalid zstd data: %v", err)
		}
	}
	return n, err
}

// detach releases an upload whose stream ended early; it expires after
// the idle timeout unless a stream resumes it.
func (s *ByteStreamServer) detach(u *upload) {
	if u.name == "" {
		u.pw.CloseWithError(status.Error(codes.Aborted, "upload interrupted"))
		return
	}
	u.idle.Reset(s.idleTimeout)
}

// expire abandons an idle upload; its Put discards the partial blob.
func (s *ByteStreamServer) expire(u *upload) {
	if !u.mu.TryLock() {
		return // resumed meanwhile
	}
	defer u.mu.Unlock()
	slog.Debug("bytestream: abandoning idle upload", "resource", u.name, "committed", u.committed.Load())
	u.pw.CloseWithError(status.Error(codes.Aborted, "upload abandoned"))
	s.finish(u)
}

// finish forgets a completed or abandoned upload.
func (s *ByteStreamServer) finish(u *upload) {
	s.mu.Lock()
	if s.uploads[u.name] == u {
		delete(s.uploads, u.name)
	}
	s.mu.Unlock()
}

// QueryWriteStatus reports how much of an upload the server holds, so an
// interrupted client can resume; a stored blob is complete.
func (s *ByteStreamServer) QueryWriteStatus(ctx context.Context, req *bspb.QueryWriteStatusRequest) (*bspb.QueryWriteStatusResponse, error) {
	rn, err := digest.ParseWriteResourceName(req.ResourceName)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	u := s.uploads[req.ResourceName]
	s.mu.Unlock()
	if u != nil {
		return &bspb.QueryWriteStatusResponse{CommittedSize: u.committed.Load()}, nil
	}
	if rn.Digest.Size() == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: 0, Complete: true}, nil
	}
	missing, err := s.stores.For(rn.Instance).CAS.FindMissing(ctx, []digest.Digest{rn.Digest})
	if err != nil {
		return nil, err
	}
	if len(missing) == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: rn.Digest.Size(), Complete: true}, nil
	}
	return nil, status.Errorf(codes.NotFound, "no upload in progress for %s", req.ResourceName)
}
