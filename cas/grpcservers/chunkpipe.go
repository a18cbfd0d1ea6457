package grpcservers

import (
	"io"
	"sync"

	"tvixfarm/cas/digest"
)

// chunkPipe connects a ByteStream Write stream to the BlobAccess.Put that
// stores it. Unlike io.Pipe it hands the received buffers over without
// copying and buffers a few of them, so receiving the next message
// overlaps storing the previous one. The writer must not modify a buffer
// after Write; received message buffers are never reused, so that holds.
// Buffers handed over with WriteOwned are given back once consumed.
type chunkPipe struct {
	ch         chan chunk
	closeOnce  sync.Once
	werr       error // set before ch is closed: the reader's final error
	readerDone chan struct{}
	doneOnce   sync.Once
	cur        chunk
	pending    []byte // small writes being collected (writer side)
}

// chunk is a buffer in the pipe, and, for one handed over with
// WriteOwned, how to give it back.
type chunk struct {
	b       []byte
	release func() // nil for the pipe's own buffers
}

func (c chunk) done() {
	if c.release != nil {
		c.release()
	}
}

func newChunkPipe() *chunkPipe {
	return &chunkPipe{ch: make(chan chunk, 4), readerDone: make(chan struct{})}
}

// coalesceSize is the size of the chunks handed to the reader when the
// client sends small messages: each handoff wakes goroutines, and clients
// that send 16 or 64 KiB messages would otherwise pay that per message.
const coalesceSize = 1 << 20

// Write hands b to the reader, or, if b is small, collects it into a chunk
// of coalesceSize first. It fails once the reader has stopped.
func (p *chunkPipe) Write(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if len(p.pending) == 0 && len(b) >= coalesceSize/2 {
		return len(b), p.send(chunk{b: b})
	}
	return p.WriteCopy(b)
}

// WriteOwned is Write for a buffer the pipe may give back: release is
// called once the reader is done with b, or at once if b is copied or
// not taken.
func (p *chunkPipe) WriteOwned(b []byte, release func()) (int, error) {
	if len(b) == 0 || len(p.pending) > 0 || len(b) < coalesceSize/2 {
		n, err := p.WriteCopy(b)
		release()
		return n, err
	}
	if err := p.send(chunk{b, release}); err != nil {
		release()
		return 0, err
	}
	return len(b), nil
}

// WriteCopy is Write for callers that reuse b: it always copies.
func (p *chunkPipe) WriteCopy(b []byte) (int, error) {
	for rest := b; len(rest) > 0; {
		if p.pending == nil {
			p.pending = make([]byte, 0, coalesceSize)
		}
		n := copy(p.pending[len(p.pending):cap(p.pending)], rest)
		p.pending = p.pending[:len(p.pending)+n]
		rest = rest[n:]
		if len(p.pending) == cap(p.pending) {
			if err := p.flush(); err != nil {
				return len(b) - len(rest) - n, err
			}
		}
	}
	return len(b), nil
}

func (p *chunkPipe) flush() error {
	if len(p.pending) == 0 {
		return nil
	}
	c := p.pending
	p.pending = nil
	return p.send(chunk{b: c})
}

func (p *chunkPipe) send(c chunk) error {
	select {
	case p.ch <- c:
		return nil
	case <-p.readerDone:
		return errPutReturned
	}
}

// CloseWithError ends the stream: the reader sees err (io.EOF if nil)
// after the buffered chunks.
func (p *chunkPipe) CloseWithError(err error) {
	p.closeOnce.Do(func() {
		if err == nil {
			err = io.EOF
			if p.flush() != nil {
				err = errPutReturned
			}
		}
		p.werr = err
		close(p.ch)
	})
}

// Close ends the stream normally.
func (p *chunkPipe) Close() error {
	p.CloseWithError(nil)
	return nil
}

// CloseRead tells writers that the reader has stopped.
func (p *chunkPipe) CloseRead() {
	p.doneOnce.Do(func() { close(p.readerDone) })
}

func (p *chunkPipe) next() (chunk, error) {
	c, ok := <-p.ch
	if !ok {
		return chunk{}, p.werr
	}
	return c, nil
}

// Read implements io.Reader.
func (p *chunkPipe) Read(b []byte) (int, error) {
	for len(p.cur.b) == 0 {
		c, err := p.next()
		if err != nil {
			return 0, err
		}
		p.cur = c
	}
	n := copy(b, p.cur.b)
	p.cur.b = p.cur.b[n:]
	if len(p.cur.b) == 0 {
		p.cur.done()
		p.cur = chunk{}
	}
	return n, nil
}

// HandsOverChunks marks chunkPipe as a digest.ChunkSource.
func (p *chunkPipe) HandsOverChunks() {}

// WriteTo implements io.WriterTo, passing the chunks themselves to w: to
// an OwningWriter with their release, to any other writer followed by
// their release when Write returns.
func (p *chunkPipe) WriteTo(w io.Writer) (int64, error) {
	ow, owning := w.(digest.OwningWriter)
	write := func(c chunk) (int, error) {
		if owning && c.release != nil {
			return ow.WriteOwned(c.b, c.release)
		}
		m, err := w.Write(c.b)
		c.done()
		return m, err
	}
	var n int64
	if len(p.cur.b) > 0 {
		m, err := write(p.cur)
		n += int64(m)
		p.cur = chunk{}
		if err != nil {
			return n, err
		}
	}
	for {
		c, err := p.next()
		if err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, err
		}
		m, err := write(c)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
}
