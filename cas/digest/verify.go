package digest

import (
	"hash"
	"io"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NewVerifyingReader returns a reader that yields r's bytes and, instead of
// io.EOF, returns an INVALID_ARGUMENT error if r yields more or fewer bytes
// than d.Size() or its hash differs from d. A consumer that commits data
// only after reading io.EOF therefore never commits a wrong blob.
func NewVerifyingReader(r io.Reader, d Digest) io.Reader {
	return &verifyingReader{r: r, d: d, h: d.fn.New()}
}

type verifyingReader struct {
	r   io.Reader
	d   Digest
	h   hash.Hash
	n   int64
	err error
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.n += int64(n)
		if v.n > v.d.size {
			v.err = status.Errorf(codes.InvalidArgument, "blob %s: received more than %d bytes", v.d, v.d.size)
			return 0, v.err
		}
		v.h.Write(p[:n])
	}
	if err == io.EOF {
		if v.err = v.check(); v.err != io.EOF {
			return n, v.err
		}
	} else if err != nil {
		v.err = err
	}
	return n, err
}

// OwningWriter is a writer that can take ownership of a buffer:
// WriteOwned writes p, which the writer may go on reading after it
// returns, and calls release at most once, when it no longer needs p. A
// buffer that is never released is left to the garbage collector.
type OwningWriter interface {
	WriteOwned(p []byte, release func()) (int, error)
}

// ChunkSource is a reader whose WriteTo hands over buffers it never
// modifies afterwards, so they may be read after Write returns. Buffers
// it passes to an OwningWriter are reused once released.
type ChunkSource interface {
	io.WriterTo
	HandsOverChunks()
}

// WriteTo implements io.WriterTo: when the source is a ChunkSource, each
// chunk is hashed on another goroutine while w writes it, so hashing and
// storing overlap. The result
// is verified as by Read: on a mismatch WriteTo returns an INVALID_ARGUMENT
// error after w has seen all the data, and the caller must discard it.
func (v *verifyingReader) WriteTo(w io.Writer) (int64, error) {
	wt, ok := v.r.(ChunkSource)
	if !ok || v.err != nil || v.n != 0 {
		return io.CopyBuffer(w, readerOnly{v}, make([]byte, 256<<10))
	}
	chunks := make(chan hashChunk, 4)
	hashed := make(chan struct{})
	go func() {
		defer close(hashed)
		for c := range chunks {
			v.h.Write(c.b)
			if c.done != nil {
				c.done()
			}
		}
	}()
	tw := &teeHashWriter{w: w, chunks: chunks, limit: v.d.size}
	n, err := wt.WriteTo(tw)
	close(chunks)
	<-hashed
	v.n = tw.n
	if err != nil {
		v.err = err
		return n, err
	}
	if v.err = v.check(); v.err != io.EOF {
		return n, v.err
	}
	return n, nil
}

// check verifies the size and hash of everything read, at the end of the
// stream: io.EOF if they match d, else an INVALID_ARGUMENT error.
func (v *verifyingReader) check() error {
	if v.n != v.d.size {
		return status.Errorf(codes.InvalidArgument, "blob %s: received %d bytes, expected %d", v.d, v.n, v.d.size)
	}
	got := Digest{fn: v.d.fn, size: v.n}
	v.h.Sum(got.hash[:0])
	if got != v.d {
		return MismatchError(v.d, got)
	}
	return io.EOF
}

// teeHashWriter writes chunks to w and queues them for hashing. Chunks
// must not be modified after Write returns, which holds for sources that
// hand over freshly received buffers.
type teeHashWriter struct {
	w      io.Writer
	chunks chan<- hashChunk
	n      int64
	limit  int64
}

// hashChunk is a chunk queued for hashing, with what to call once hashed.
type hashChunk struct {
	b    []byte
	done func()
}

func (t *teeHashWriter) Write(p []byte) (int, error) {
	if t.n+int64(len(p)) > t.limit {
		return 0, status.Errorf(codes.InvalidArgument, "received more than %d bytes", t.limit)
	}
	t.chunks <- hashChunk{b: p}
	t.n += int64(len(p))
	return t.w.Write(p)
}

// WriteOwned implements OwningWriter: p is released once it is both
// hashed and written to w (which, as an io.Writer, does not keep it).
func (t *teeHashWriter) WriteOwned(p []byte, release func()) (int, error) {
	if t.n+int64(len(p)) > t.limit {
		release()
		return 0, status.Errorf(codes.InvalidArgument, "received more than %d bytes", t.limit)
	}
	var users atomic.Int32
	users.Store(2)
	done := func() {
		if users.Add(-1) == 0 {
			release()
		}
	}
	t.chunks <- hashChunk{b: p, done: done}
	t.n += int64(len(p))
	n, err := t.w.Write(p)
	done()
	return n, err
}

type readerOnly struct{ io.Reader }
